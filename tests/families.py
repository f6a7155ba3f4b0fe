"""Tiny random models of each architecture family, built offline from ``transformers`` configs
and bridged like a real checkpoint (no download, well under a second each)."""

from __future__ import annotations

from typing import Any, Callable

import torch

# Every family: 2 layers, d_model 64, 4 query heads; KV heads as the family usually groups them.
_COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "GPT2LMHeadModel": lambda: tf.GPT2Config(vocab_size=64, n_positions=128, n_embd=64, n_layer=2, n_head=4),
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXConfig(**_COMMON),
        "LlamaForCausalLM": lambda: tf.LlamaConfig(num_key_value_heads=2, **_COMMON),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(num_key_value_heads=2, **_COMMON),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(num_key_value_heads=1, head_dim=16, **_COMMON),
        "Gemma3ForCausalLM": lambda: tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, **_COMMON),
    }


FAMILIES = list(_configs())


def tiny_family_model(architecture: str, seed: int = 0) -> Any:
    """A random ``architecture`` (a name in :data:`FAMILIES`) as an eval-mode TransformerBridge."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    config = _configs()[architecture]()
    torch.manual_seed(seed)
    hf_model = getattr(transformers, architecture)(config).eval()
    bridge = build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=None)
    return bridge.eval()
