"""Remake the README's pictures from an atlas of the bundled model.

    .venv/bin/headscope atlas --model smollm2-135m-instruct --out atlas/
    .venv/bin/python scripts/make_docs_figures.py --atlas atlas/

writes docs/role_map.svg (the atlas's role map) and docs/attention_pattern.svg: the attention
of the atlas's strongest induction head on a sentence said twice, seen from the second
' storm' (an induction head looks at the token that followed it the first time, ' arrived'). It
also prints that head's mean attention, over every token of the second copy, to the token after
the same token in the first copy: the picture's query is one of them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

import headscope as hs
from headscope.files import atomic_write_text

SENTENCE = "The old lighthouse keeper painted the railing blue before the storm arrived."
DOCS = Path(__file__).resolve().parents[1] / "docs"


def second_occurrence(tokens: list[str], word: str) -> int:
    """Position of the second token equal to ``word`` (the query of the picture)."""
    positions = [i for i, token in enumerate(tokens) if token == word]
    if len(positions) < 2:
        raise SystemExit(f"make_docs_figures: {word!r} is not twice among the tokens {tokens}")
    return positions[1]


def induction_attention(pattern: Tensor) -> float:
    """Mean attention from each token of the second copy (BOS, copy, copy) to the token after
    its first occurrence."""
    length = (pattern.shape[0] - 1) // 2
    return float(torch.stack([pattern[q, q - length + 1] for q in range(length + 1, pattern.shape[0])]).mean())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas", type=Path, required=True, help="folder of a finished atlas of the bundled model")
    args = parser.parse_args(argv)
    atlas = hs.Atlas.load(args.atlas)
    head = atlas.significant_heads("induction")[0]
    model = hs.load_model(atlas.model, device="cpu")
    patterns = hs.attention_patterns(model, f"{SENTENCE} {SENTENCE}", heads=[head], title="a sentence said twice")
    query = second_occurrence(patterns.tokens, " storm")
    DOCS.mkdir(exist_ok=True)
    atomic_write_text(DOCS / "attention_pattern.svg", patterns.to_svg(head, query=query, width=720))
    shutil.copyfile(args.atlas / "role_map.svg", DOCS / "role_map.svg")
    best = patterns.top_keys(head, query, k=1)[0]
    print(f"{head}: from the second ' storm' (token {query}) most attention on token {best[0]} {best[1]!r} "
          f"({best[2]:.2f}); mean attention to the induction target over the second copy "
          f"{induction_attention(patterns[head]):.2f}; wrote {DOCS / 'attention_pattern.svg'} and {DOCS / 'role_map.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
