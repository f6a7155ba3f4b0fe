"""Per-example behavioural metrics computed from logits."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def final_logits(logits: Tensor, chunk: Any) -> Float[Tensor, "batch vocab"]:
    """Each row's logits at its last real position, from a full ``[batch, pos, vocab]`` run or from a
    ``run_batched(..., logits="last")`` run that already gives ``[batch, vocab]``."""
    if logits.ndim == 2:
        return logits
    rows = torch.arange(len(chunk), device=logits.device)
    return logits[rows, chunk.last_positions.to(logits.device)]


def next_token_losses(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of predicting ``tokens[:, i + 1]`` from position ``i`` (float32)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def masked_mean(values: Float[Tensor, "batch n"], mask: Bool[Tensor, "batch n"]) -> Float[Tensor, " batch"]:
    """Mean of each row over the entries where ``mask`` is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
