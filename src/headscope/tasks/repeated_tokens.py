"""Repeated random tokens: the induction-head task of Olsson et al. 2022.

Each sequence is ``[BOS] + block * n_repeats`` where ``block`` holds ``block_len`` distinct
random token ids. Ids are drawn from a middle band of the vocabulary (by default from 2% to 50%
of the ids), which for BPE tokenizers, whose ids roughly follow merge order, leaves out special
tokens, the most common short pieces and the rarest merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass(frozen=True)
class RepeatedTokens:
    """A batch of repeated random token sequences and where each position sits."""

    tokens: Int[Tensor, "batch pos"]
    block_len: int
    n_repeats: int
    has_bos: bool

    @property
    def offset(self) -> int:
        """Position of the first token of the first block."""
        return 1 if self.has_bos else 0

    def repeat_index(self) -> Int[Tensor, " pos"]:
        """Which repeat (0, 1, ...) each position belongs to; -1 for the BOS."""
        positions = torch.arange(self.tokens.shape[1]) - self.offset
        index = torch.div(positions, self.block_len, rounding_mode="floor")
        index[positions < 0] = -1
        return index

    def in_later_repeats(self) -> Bool[Tensor, " pos"]:
        """Positions in the second and later repeats."""
        return self.repeat_index() >= 1

    def predictable_targets(self) -> Bool[Tensor, " pos_minus_1"]:
        """For next-token losses (``logits[:, i]`` predicts ``tokens[:, i + 1]``): predictions an
        induction mechanism can make, i.e. targets in later repeats except the very first token of
        the second repeat (whose predecessor has not been seen followed by it)."""
        targets = torch.arange(1, self.tokens.shape[1])
        first_repeated = self.offset + self.block_len
        return targets > first_repeated


def repeated_random_tokens(
    d_vocab: int,
    n_sequences: int = 32,
    block_len: int = 25,
    n_repeats: int = 4,
    bos_token_id: Optional[int] = None,
    token_range: Optional[tuple[int, int]] = None,
    seed: int = 0,
) -> RepeatedTokens:
    """Generate ``n_sequences`` sequences of ``block_len`` distinct random ids repeated ``n_repeats`` times."""
    if block_len < 2 or n_repeats < 2 or n_sequences < 1:
        raise ValueError("Need block_len >= 2, n_repeats >= 2 and n_sequences >= 1.")
    low, high = token_range or default_token_range(d_vocab)
    if not 0 <= low < high <= d_vocab:
        raise ValueError(f"token_range {(low, high)} must lie within 0..{d_vocab}.")
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(low, high)
    if bos_token_id is not None:
        candidates = candidates[candidates != bos_token_id]
    if len(candidates) < block_len:
        raise ValueError(f"token_range {(low, high)} has fewer than block_len={block_len} usable ids.")
    blocks = torch.stack(
        [candidates[torch.randperm(len(candidates), generator=generator)[:block_len]] for _ in range(n_sequences)]
    )
    tokens = blocks.repeat(1, n_repeats)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((n_sequences, 1), bos_token_id, dtype=torch.long), tokens], dim=1)
    return RepeatedTokens(tokens=tokens, block_len=block_len, n_repeats=n_repeats, has_bos=bos_token_id is not None)


def default_token_range(d_vocab: int) -> tuple[int, int]:
    """The middle band of ids, [2%, 50%) of the vocabulary (all but id 0 for tiny vocabularies)."""
    low = max(1, int(0.02 * d_vocab))
    high = max(low + 1, int(0.5 * d_vocab))
    return low, high


def unrepeated_like(
    task: RepeatedTokens, d_vocab: int, token_range: Optional[tuple[int, int]] = None, seed: int = 0
) -> RepeatedTokens:
    """Random tokens of ``task``'s shape (same BOS, block length and count) that never repeat:
    every block is a fresh draw, so the template positions of ``task`` (an earlier copy, the token
    after it) hold tokens with no relation to the query. The null input of the attention-template
    detectors. Ids are distinct within a sequence when the token range has enough of them."""
    low, high = token_range or default_token_range(d_vocab)
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(low, high)
    if task.has_bos:
        candidates = candidates[candidates != int(task.tokens[0, 0])]
    n_sequences = task.tokens.shape[0]
    length = task.block_len * task.n_repeats
    if len(candidates) >= length:
        rows = [candidates[torch.randperm(len(candidates), generator=generator)[:length]] for _ in range(n_sequences)]
    else:  # a tiny vocabulary: distinct within each block only
        rows = [torch.cat([candidates[torch.randperm(len(candidates), generator=generator)[: task.block_len]]
                           for _ in range(task.n_repeats)]) for _ in range(n_sequences)]
    tokens = torch.stack(rows)
    if task.has_bos:
        tokens = torch.cat([task.tokens[:, :1], tokens], dim=1)
    return RepeatedTokens(tokens=tokens, block_len=task.block_len, n_repeats=task.n_repeats, has_bos=task.has_bos)


def unrepeated_rows(
    n_rows: int, length: int, d_vocab: int, token_range: Optional[tuple[int, int]] = None,
    bos_token_id: Optional[int] = None, seed: int = 0,
) -> Int[Tensor, "n_rows pos"]:
    """``n_rows`` rows of ``length`` random ids, distinct within each row when the token range
    has enough ids (else distinct within each stretch of that many), after a BOS column when
    ``bos_token_id`` is given: the null input for templates read from text."""
    low, high = token_range or default_token_range(d_vocab)
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(low, high)
    if bos_token_id is not None:
        candidates = candidates[candidates != bos_token_id]
    stretches = -(-length // len(candidates))
    rows = [torch.cat([candidates[torch.randperm(len(candidates), generator=generator)] for _ in range(stretches)])[:length]
            for _ in range(n_rows)]
    tokens = torch.stack(rows)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((n_rows, 1), bos_token_id, dtype=torch.long), tokens], dim=1)
    return tokens
