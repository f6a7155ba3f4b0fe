"""Natural text of the researcher's own, cut into token windows: the data of the attention-template
detectors (induction, previous-token, duplicate-token) when a ``data`` file is given.

Formats:

* ``.txt``: UTF-8 text, one document (a book, an article, code);
* ``.jsonl``: one document per line, ``{"text": "..."}``.

Each document is tokenized without special tokens and cut into consecutive windows of
``length`` tokens; every token lands in exactly one window (a document's last window is shorter,
and is padded in the batch). Each window starts with the model's BOS when it has one. Nothing is
dropped silently: windows of fewer than two tokens are counted in ``TextWindows.n_dropped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from headscope.engine.tokens import TokenBatch
from headscope.errors import DataError
from headscope.tasks.user_data import data_file, line_error, read_jsonl, read_text

TEXT_EXAMPLE = '{"text": "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say ..."}'
FORMATS = (".txt", ".jsonl")


def read_documents(path: Any) -> list[str]:
    """The documents of a ``.txt`` file (the whole text, one document) or a ``.jsonl`` file
    (``{"text": ...}`` per line); a :class:`DataError` names the file and line of a problem."""
    path = data_file(path, "text")
    if path.suffix == ".txt":
        text = read_text(path, "text")
        if not text.strip():
            raise DataError(f"{path} holds no text: give a UTF-8 file with the text to scan.")
        return [text]
    if path.suffix == ".jsonl":
        documents = []
        for number, row in read_jsonl(path, ["text"], TEXT_EXAMPLE, "text"):
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise line_error(path, number, "'text' must be a non-empty string", TEXT_EXAMPLE)
            documents.append(row["text"])
        return documents
    raise DataError(f"{path.name}: text data is a .txt file (one document) or a .jsonl file ({TEXT_EXAMPLE} per "
                    f"line); rename or convert the file.")


@dataclass(frozen=True)
class TextWindows:
    """Token windows cut from natural text, right-padded, each starting with the BOS if any."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    has_bos: bool
    n_text_tokens: int  # text tokens in all windows (BOS not counted)
    n_dropped: int = 0  # windows of fewer than two tokens, left out of the whole text (kept by ``rows``)

    @property
    def offset(self) -> int:
        """Position of the first text token of each window."""
        return 1 if self.has_bos else 0

    @property
    def batch(self) -> TokenBatch:
        return TokenBatch(self.tokens, self.attention_mask)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, index: Sequence[int]) -> "TextWindows":
        """Some windows, trimmed to their longest."""
        index = list(index)
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max()) if index else 0
        n_text = int(mask.sum()) - (len(index) if self.has_bos else 0)
        return TextWindows(self.tokens[index, :width], mask[:, :width], self.has_bos, n_text, self.n_dropped)


def text_windows(tokenizer: Any, documents: Sequence[str], length: int, bos_token_id: Optional[int],
                 pad_token_id: int) -> TextWindows:
    """Every document tokenized (no special tokens) and cut into windows of ``length`` tokens."""
    if length < 2:
        raise DataError(f"text_length must be at least 2 tokens, got {length}.")
    rows, dropped = [], 0
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), length):
            window = ids[start : start + length]
            if len(window) < 2:
                dropped += 1
                continue
            rows.append(([bos_token_id] if bos_token_id is not None else []) + list(window))
    if not rows:
        raise DataError("The text data tokenizes to no window of two tokens or more: give more text.")
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    n_text = int(mask.sum()) - (len(rows) if bos_token_id is not None else 0)
    return TextWindows(tokens, mask, bos_token_id is not None, n_text, dropped)


def split_windows(windows: TextWindows, n_score: int, n_validation: int, seed: int,
                  path: Path | str = "the text") -> tuple[TextWindows, TextWindows]:
    """Scoring and held-out validation windows: a seeded shuffle, the first half scored (at most
    ``n_score``), the second half held out (at most ``n_validation``), so no window is both."""
    if len(windows) < 2:
        raise DataError(f"{path} gives {len(windows)} window of text: scoring and held-out validation need at least "
                        f"two. Give more text or a smaller text_length.")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    half = (len(order) + 1) // 2
    return windows.rows(sorted(order[:half][:n_score])), windows.rows(sorted(order[half:][:n_validation]))
