"""The English prose shipped with headscope as documents, ready to cut into token windows
(:func:`headscope.tasks.natural_text.text_windows`): natural text that is no task of its own,
for scores that read what a head does on ordinary text (the attention-sink and copy-suppression
detectors).

Documents, in order:

* ``reference_text.txt``: short paragraphs on everyday scenes (the default mean-ablation
  reference), one per line, joined with single spaces into one document;
* ``haystack_filler.txt``: a few short essays (the retrieval detector's filler), line breaks and
  runs of spaces made one space, one document.

About 12k tokens in all with SmolLM2's tokenizer.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Optional

from headscope.engine.heads import model_shape
from headscope.engine.tokens import bos_token_id, pad_token_id
from headscope.errors import InputError, SettingError
from headscope.tasks.natural_text import TextWindows, read_documents, split_windows, text_windows

SHIPPED_FILES = ("reference_text.txt", "haystack_filler.txt")


@lru_cache(maxsize=1)
def shipped_documents() -> tuple[str, ...]:
    """The shipped prose, one document per file of :data:`SHIPPED_FILES` (whitespace made single
    spaces)."""
    folder = resources.files("headscope.tasks").joinpath("data")
    return tuple(" ".join(folder.joinpath(name).read_text("utf-8").split()) for name in SHIPPED_FILES)


def without_bos(windows: TextWindows) -> TextWindows:
    """The same windows with their leading BOS dropped (unchanged when they have none): the first
    text token is then at position 0. Every window keeps at least two tokens, so one query after
    position 0 (``text_windows`` leaves out shorter ones)."""
    if not windows.has_bos:
        return windows
    return TextWindows(windows.tokens[:, 1:], windows.attention_mask[:, 1:], False, windows.n_text_tokens,
                       windows.n_dropped)


def prose_windows(model: Any, detector: str, length: int, n_score: int, n_validation: int, seed: int,
                  data: Optional[str] = None) -> tuple[TextWindows, TextWindows]:
    """Scoring and held-out windows of ``length`` text tokens (after the BOS where the tokenizer
    has one) of the shipped prose, or of the user's ``data`` file, split by ``seed``
    (:func:`~headscope.tasks.natural_text.split_windows`: no window in both).

    Raises:
        InputError: the model has no tokenizer (naming ``detector``).
        SettingError: ``length`` (with the BOS) longer than the model's context.
        DataError: a bad ``data`` file, or text too short for two windows.
    """
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"The {detector} detector reads natural text and needs the model's tokenizer; this model "
                         "has none. Load the model with its tokenizer.")
    bos = bos_token_id(model)
    context = model_shape(model).n_ctx
    if length + (bos is not None) > context:
        raise SettingError(f"text_length {length}{' (plus the BOS)' * (bos is not None)} is longer than the model's "
                           f"context of {context} tokens: set text_length to at most {context - (bos is not None)}.")
    documents = read_documents(data) if data else list(shipped_documents())
    windows = text_windows(model.tokenizer, documents, length, bos, pad_token_id(model))
    return split_windows(windows, n_score, n_validation, seed, data or "the shipped text")
