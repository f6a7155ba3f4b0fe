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

from headscope.tasks.natural_text import TextWindows

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
