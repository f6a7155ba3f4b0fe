"""Token batches: right-padded token ids with an attention mask.

Convention for plain prompts: headscope prepends the tokenizer's BOS token (for
SmolLM2-135M-Instruct that is ``<|im_start|>``, id 1, since its tokenizer adds no start token)
unless the prompt already starts with it. Token-level tasks build their tensors with the same
BOS first. Batches are padded on the right, so real tokens keep their positions (rotary
embeddings see the same positions as an unpadded run) and padded positions are masked out of
attention and out of every score (``attention_mask == 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from headscope.engine.heads import model_shape
from headscope.errors import InputError, PromptTooLongError


@dataclass
class TokenBatch:
    """Right-padded token ids and their mask. ``lengths[i]`` real tokens in row ``i``."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    def __post_init__(self) -> None:
        if self.tokens.shape != self.attention_mask.shape:
            raise InputError(
                f"tokens {tuple(self.tokens.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must have the same shape."
            )

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.attention_mask.sum(dim=1)

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        """Index of the last real token of each row."""
        return self.lengths - 1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, rows: Union[slice, Tensor, Sequence[int]]) -> "TokenBatch":
        """Some rows, trimmed to their longest real length."""
        tokens, mask = self.tokens[rows], self.attention_mask[rows]
        width = int(mask.sum(dim=1).max().item()) if len(mask) else 0
        return TokenBatch(tokens[:, :width], mask[:, :width])

    def to(self, device: Union[str, torch.device]) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device))

    @property
    def is_padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    @property
    def forward_mask(self) -> Optional[Int[Tensor, "batch pos"]]:
        """The mask to hand the model: the attention mask, or None when no row is padded."""
        return self.attention_mask if self.is_padded else None


def bos_token_id(model: Any) -> Optional[int]:
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(model.cfg, "bos_token_id", None)
    return None if bos is None else int(bos)


def pad_token_id(model: Any) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.cfg, "pad_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize(model: Any, prompts: Union[str, Sequence[str]], prepend_bos: bool = True) -> TokenBatch:
    """Tokenize prompts into a right-padded ``TokenBatch`` (BOS first; see module docstring)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("The prompt list is empty; give at least one prompt.")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            "This model has no tokenizer, so it cannot take text prompts; pass token ids instead "
            "(a [batch, pos] tensor or a list of id lists)."
        )
    bos = bos_token_id(model) if prepend_bos else None
    rows: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"Prompt {index} is a {type(prompt).__name__}, not a string.")
        if not prompt:
            raise InputError(f"Prompt {index} is empty; remove it or give it some text.")
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        rows.append(ids)
    return pad_rows(model, rows)


def pad_rows(model: Any, rows: Sequence[Sequence[int]]) -> TokenBatch:
    """List of id lists → right-padded, checked ``TokenBatch``."""
    if len(rows) == 0:
        raise InputError("The token list is empty; give at least one sequence.")
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_token_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if len(row) == 0:
            raise InputError(f"Sequence {index} has no tokens; remove it.")
        tokens[index, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[index, : len(row)] = 1
    return check_batch(model, TokenBatch(tokens, mask))


def as_token_batch(model: Any, data: Any, prepend_bos: bool = True) -> TokenBatch:
    """Accept prompts, a token tensor, id lists or a ``TokenBatch``; return a checked batch.

    Token tensors are taken as they are (no BOS added): token-level tasks put BOS themselves.
    """
    if isinstance(data, TokenBatch):
        return check_batch(model, data)
    if isinstance(data, str) or (
        isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(p, str) for p in data)
    ):
        return tokenize(model, data, prepend_bos=prepend_bos)
    if isinstance(data, Tensor):
        if data.ndim == 1:
            data = data.unsqueeze(0)
        if data.ndim != 2 or data.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise InputError(
                f"Token ids must be an integer tensor [batch, pos]; got {data.dtype} {tuple(data.shape)}."
            )
        if data.numel() == 0:
            raise InputError("The token tensor is empty; give at least one token.")
        tokens = data.long().cpu()
        return check_batch(model, TokenBatch(tokens, torch.ones_like(tokens)))
    if isinstance(data, (list, tuple)):
        return pad_rows(model, data)
    raise InputError(
        f"Cannot run {type(data).__name__}; give a prompt string, a list of prompts, a [batch, pos] "
        f"token tensor, a list of token id lists or a TokenBatch."
    )


def check_batch(model: Any, batch: TokenBatch, extra_tokens: int = 0) -> TokenBatch:
    """Raise on empty batches, over-long rows (``extra_tokens`` more will be generated) and ids
    outside the vocabulary."""
    shape = model_shape(model)
    if len(batch) == 0 or batch.tokens.shape[1] == 0:
        raise InputError("The batch is empty; give at least one sequence with at least one token.")
    if (batch.lengths == 0).any():
        row = int(torch.nonzero(batch.lengths == 0)[0, 0])
        raise InputError(f"Sequence {row} has no real tokens (its attention mask is all zero).")
    longest = int(batch.lengths.max())
    if longest + extra_tokens > shape.n_ctx:
        row = int(batch.lengths.argmax())
        more = f" plus {extra_tokens} to generate" if extra_tokens else ""
        raise PromptTooLongError(
            f"Sequence {row} has {longest} tokens{more}, more than the model's context of {shape.n_ctx}. "
            f"headscope never truncates silently: shorten the prompt or split it into windows of at "
            f"most {shape.n_ctx} tokens."
        )
    real = batch.tokens[batch.attention_mask.bool()]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= shape.d_vocab):
        raise InputError(
            f"Token ids must lie in 0..{shape.d_vocab - 1} for this model; got ids from "
            f"{int(real.min())} to {int(real.max())}."
        )
    return batch


def encode_with_offsets(
    model_or_tokenizer: Any, text: str, prepend_bos: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span ``(start, end)`` in it, with BOS in
    front as :func:`tokenize` puts it (BOS gets the empty span ``(0, 0)``). Positions found from
    these spans match the rows of ``tokenize(model, [text])``."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not prepend_bos:
        bos = None
    elif hasattr(model_or_tokenizer, "cfg"):
        bos = bos_token_id(model_or_tokenizer)
    else:
        bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    return ids, offsets


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Positions [first, last + 1) of every token whose characters overlap ``[start, end)``."""
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise InputError(f"No token covers characters {start}..{end}; the tokenizer gave no offsets there.")
    return inside[0], inside[-1] + 1


def row_tokens(batch: TokenBatch, row: int) -> tuple[int, ...]:
    """The real tokens of one row, as a hashable key (metrics match chunk rows to items by it)."""
    return tuple(batch.tokens[row, : int(batch.lengths[row])].tolist())


def iter_batches(batch: TokenBatch, batch_size: int) -> Iterator[tuple[slice, TokenBatch]]:
    """Yield ``(rows, sub-batch)`` chunks of at most ``batch_size`` rows, each trimmed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(batch), batch_size):
        rows = slice(start, min(start + batch_size, len(batch)))
        yield rows, batch.select(rows)


WORD_ANCHOR = "a"  # a word the tokenizers read as one token: what comes after it reads as a word in running text


def spaced_word_ids(tokenizer: Any, word: str) -> list[int]:
    """The token ids of ``word`` as it stands after a space in running text ("... gave a drink to
    Mary"): the ids of ``"a " + word`` less those of ``"a"``. Byte-level BPE (GPT-2, Llama 3,
    SmolLM2) writes it ``"ĠMary"`` either way; a SentencePiece tokenizer that prepends a space to
    the text (Llama 2, Mistral v0.1, Phi-3) encodes ``" Mary"`` alone as ``["▁", "▁Mary"]`` but
    writes ``"▁Mary"`` after a word, which is what a prompt holds. Falls back to encoding
    ``" " + word`` when the anchor does not stay a prefix."""
    word = word.lstrip(" ")
    anchor = tokenizer(WORD_ANCHOR, add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"{WORD_ANCHOR} {word}", add_special_tokens=False)["input_ids"]
    if list(ids[:len(anchor)]) != list(anchor):
        return list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
    return list(ids[len(anchor):])


def spaced_word_token(tokenizer: Any, word: str) -> Optional[int]:
    """The single token id of ``word`` after a space in running text (:func:`spaced_word_ids`),
    or None when it takes several tokens."""
    ids = spaced_word_ids(tokenizer, word)
    return int(ids[0]) if len(ids) == 1 else None


def spaced_token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads after a word: ``" pier"`` for byte-level ``"Ġpier"`` and for
    SentencePiece ``"▁pier"`` alike (decoding a SentencePiece token alone drops its space)."""
    anchor = list(tokenizer(WORD_ANCHOR, add_special_tokens=False)["input_ids"])
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([anchor + [int(i)] for i in ids], clean_up_tokenization_spaces=False)
    return [text[len(prefix):] if text.startswith(prefix) else text for text in texts]
