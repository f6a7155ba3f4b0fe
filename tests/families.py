"""Tiny random models of each architecture family, built offline from ``transformers`` configs
and bridged like a real checkpoint (no download, well under a second each)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

# Where the tiny models of the tests live: "cpu" (the default), or e.g. "cuda" to run the unit
# tests on a GPU (benchmarks/gpu_check.sh). tiny_family_model, tests.conftest.tiny_model and the
# tiny_llama fixture put their models there.
TEST_DEVICE = os.environ.get("HEADSCOPE_TEST_DEVICE", "cpu")

# Every family: 2 layers, d_model 64, 4 query heads of 16; KV heads as the family usually groups
# them. A wide initialisation makes attention patterns and logits far from uniform, so the checks
# below have something to detect.
_COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.2)


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "GPT2LMHeadModel": lambda: tf.GPT2Config(vocab_size=64, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                                 initializer_range=0.2),
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXConfig(**_COMMON),
        "LlamaForCausalLM": lambda: tf.LlamaConfig(num_key_value_heads=2, **_COMMON),
        "MistralForCausalLM": lambda: tf.MistralConfig(num_key_value_heads=2, **_COMMON),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(num_key_value_heads=2, **_COMMON),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(num_key_value_heads=1, head_dim=16, **_COMMON),
        "Gemma3ForCausalLM": lambda: tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, **_COMMON),
        "Phi3ForCausalLM": lambda: tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_COMMON),
        "Olmo2ForCausalLM": lambda: tf.Olmo2Config(num_key_value_heads=2, **_COMMON),
        "PhiForCausalLM": lambda: tf.PhiConfig(**_COMMON),
    }


FAMILIES = list(_configs())


def tiny_family_model(architecture: str, seed: int = 0, with_tokenizer: bool = False) -> Any:
    """A random ``architecture`` (a name in :data:`FAMILIES`) as an eval-mode TransformerBridge;
    ``with_tokenizer``: with a byte-level tokenizer (every character one token) and its vocabulary,
    so that text tasks run."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model, tokenizer = tiny_hf_model(architecture, seed, with_tokenizer)
    bridge = build_bridge_from_module(hf_model.to(TEST_DEVICE), architecture, hf_config=hf_model.config,
                                      tokenizer=tokenizer)
    return bridge.eval()


def tiny_hf_model(architecture: str, seed: int = 0, with_tokenizer: bool = False) -> tuple[Any, Any]:
    """The Hugging Face model of :func:`tiny_family_model` (same weights for the same seed), and its
    tokenizer (None unless ``with_tokenizer``)."""
    import transformers

    config = _configs()[architecture]()
    tokenizer = byte_tokenizer() if with_tokenizer else None
    if tokenizer is not None:  # characters make long prompts: a longer context too
        config.vocab_size = len(tokenizer)
        setattr(config, "n_positions" if architecture == "GPT2LMHeadModel" else "max_position_embeddings", 1024)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 1
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(config).eval(), tokenizer


def offloading_device_map(hf_model: Any) -> dict[str, str]:
    """A device map that splits a tiny ``model.*`` family (Llama, Qwen2, Gemma 3, ...) as a model too
    large for its GPU would be: the input embedding, odd layers and the rest of ``model`` on disk,
    even layers and the output head offloaded to the CPU (the embedding and a tied output head
    stay together)."""
    device_map = {f"model.{name}": "disk" for name, _ in hf_model.model.named_children() if name != "layers"}
    device_map.update({f"model.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(len(hf_model.model.layers))})
    device_map["lm_head"] = "disk" if hf_model.config.tie_word_embeddings else "cpu"
    return device_map


def split_family_model(architecture: str, offload_folder: Any, seed: int = 0, with_tokenizer: bool = False) -> Any:
    """:func:`tiny_family_model` (same weights for the same seed) dispatched by accelerate with
    :func:`offloading_device_map`: every parameter a placeholder on ``"meta"``, loaded for each call
    from a CPU copy or from ``offload_folder`` on disk. The CPU stands in for the GPU that would
    run the layers (accelerate's main device), so CPU offload happens as it would on a GPU machine."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    import headscope as hs

    hf_model, tokenizer = tiny_hf_model(architecture, seed, with_tokenizer)
    # torch.device("cpu"), not "cpu": accelerate then offloads "cpu" entries as for a GPU main device
    hf_model = dispatch_model(hf_model, offloading_device_map(hf_model), main_device=torch.device("cpu"),
                              offload_dir=str(offload_folder))
    bridge = build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer)
    return hs.load_model(bridge)


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer: ``<s>``, ``</s>``, the 256 bytes and one merge per capital letter
    after a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", letter) for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]  # " A" is one token, as option letters must be
    symbols = ["<s>", "</s>", *alphabet, *(a + b for a, b in merges)]
    tokenizer = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(symbols)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return _saved_and_reloaded(fast)


def _saved_and_reloaded(tokenizer: Any) -> Any:
    """TransformerLens 4.3 needs a tokenizer that knows its ``name_or_path``: one read from a folder
    (kept while the test process runs, which may read it again, and removed when it exits)."""
    import atexit
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="headscope-byte-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
