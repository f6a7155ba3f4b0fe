"""Data of the copy-suppression detector: candidate word tokens. Its text windows are the shipped
prose's (``headscope.tasks.plain_text.prose_windows``, as the attention-sink detector's).

* Candidate tokens: the tokenizer's *word tokens* (a leading space, then at least two letters,
  e.g. ``" pier"``, ``" Mary"``: the tokens copy suppression is about in McDougall et al. 2023),
  or every non-special token id; a seeded sample of them (``candidate_tokens``).
"""

from __future__ import annotations

from typing import Any

import torch

from headscope.engine.tokens import spaced_token_texts
from headscope.errors import InputError

TOKEN_POOLS = ("words", "all")


def is_word_token(text: str) -> bool:
    """A leading space and then two or more letters only (``" pier"``, not ``"pier"`` or ``" 3"``)."""
    return text.startswith(" ") and len(text) >= 3 and text[1:].isalpha()


def token_pool(model: Any, pool: str) -> list[int]:
    """Every token id of ``pool``: ``"words"`` (word tokens, needs the tokenizer; each token read
    as it stands after a word, :func:`~headscope.engine.tokens.spaced_token_texts`, so that
    SentencePiece's ``"▁pier"`` counts as byte-level BPE's ``"Ġpier"`` does) or ``"all"`` (every id
    of the unembedding, less the tokenizer's special tokens when it has one)."""
    if pool not in TOKEN_POOLS:
        raise InputError(f"Unknown token pool {pool!r}; choose one of {', '.join(TOKEN_POOLS)}.")
    n_vocab = int(model.cfg.d_vocab)  # the unembedding's width (W_U is not readable when it is offloaded)
    tokenizer = getattr(model, "tokenizer", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if pool == "all":
        return [i for i in range(n_vocab) if i not in special]
    if tokenizer is None:
        raise InputError("The 'words' token pool reads the tokenizer, and this model has none: load it with its "
                         "tokenizer, or set tokens='all'.")
    decoded = spaced_token_texts(tokenizer, range(min(n_vocab, len(tokenizer))))
    return [i for i, text in enumerate(decoded) if i not in special and is_word_token(text)]


def candidate_tokens(model: Any, pool: str, n_tokens: int, seed: int) -> list[int]:
    """``n_tokens`` ids drawn from the pool without replacement by ``seed`` (all of them when the
    pool is smaller), sorted by id."""
    ids = token_pool(model, pool)
    if len(ids) <= n_tokens:
        return ids
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n_tokens]
    return sorted(ids[i] for i in order.tolist())

