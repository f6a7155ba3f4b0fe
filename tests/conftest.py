"""Shared fixtures: tiny native models (fast) and the bundled pretrained model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_model(n_layers=2, n_heads=4, n_kv_heads=None, d_vocab=64, n_ctx=64, attn_only=True, seed=0, rotary=False):
    """A random TransformerBridge built natively by TransformerLens (no download, < 1 s)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)

    torch.manual_seed(seed)
    settings = dict(
        n_layers=n_layers, d_model=64, n_heads=n_heads, d_head=16, d_vocab=d_vocab, n_ctx=n_ctx,
        attn_only=attn_only, seed=seed, normalization_type="LN",
        positional_embedding_type="rotary" if rotary else "standard",
    )
    if n_kv_heads is not None:
        settings["n_key_value_heads"] = n_kv_heads
    if not attn_only:
        settings.update(d_mlp=128, act_fn="gelu")
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**settings))
    model.eval()
    return model


def tiny_llama_folder(path):
    """A random 2-layer Llama with grouped-query attention and a word-level tokenizer, saved as a
    Hugging Face folder (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>"] + [f"w{i}" for i in range(62)]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_text_llama_folder(path, max_positions=1024):
    """A random 2-layer Llama (4 query heads on 2 KV heads) with the byte-level tokenizer of
    ``tests.families`` (every character a token, so any text runs), saved as a Hugging Face
    folder: what the CLI loads when a test scores its own text data (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.families import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def active_hooks(model) -> int:
    """Torch forward/backward hooks attached to the model's hook points (each counted once),
    plus any TransformerLens handle still registered."""
    unique = {id(point): point for point in model.hook_dict.values()}.values()
    torch_hooks = sum(len(p._forward_hooks) + len(p._backward_hooks) for p in unique)
    lens_handles = sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in unique)
    return max(torch_hooks, lens_handles)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def tiny_gqa():
    return tiny_model(n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct, loaded once per session."""
    import headscope as hs

    return hs.load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama (GQA, rotary, HF KV cache) loaded through hs.load_model."""
    import headscope as hs

    return hs.load_model(tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-session")), device="cpu")


PRETRAINED_FIXTURES = ("smollm",)


def pytest_collection_modifyitems(config, items):
    """A test that loads a pretrained model belongs to the slow lane: mark it ``repro`` so that
    ``pytest -m "not repro"`` (the fast lane) never loads one, wherever the test lives."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in PRETRAINED_FIXTURES):
            item.add_marker(pytest.mark.repro)


@pytest.fixture
def one_thread():
    """Small tensor ops in a loop (bootstraps, simulations) run several times faster on one thread
    than contending for many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
