"""Select-and-copy head studies — Tulchinskii et al. 2024: workflows on the option readout of
the ``select_copy`` detector (``headscope.detectors.select_copy``).

:func:`compare` sets the best dev head of each score against the model's own letters on held-out
questions (paired bootstrap CI, sign-flip permutation p-value, the random-head control);
:func:`split_stability` reselects the best head on random dev splits.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from headscope.detectors.select_copy import OptionReadout, _best_head
from headscope.stats import paired_bootstrap_ci, paired_permutation_p
from headscope.viz.figures import axes_for, difference_bars, finish


@dataclass
class MethodComparison:
    """Held-out accuracy of a head chosen on dev against the letter logits, on the same questions."""

    method: str
    head: str
    dev_accuracy: float
    test_accuracy: float
    letter_accuracy: float
    difference: float  # test_accuracy - letter_accuracy
    ci_low: float
    ci_high: float
    p_value: float  # paired permutation test of the difference
    random_head_accuracy: float  # mean held-out accuracy over every head (the random-head control)
    n_test: int

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """Held-out accuracy of the chosen head, of the letter logits and of a random head, with
        the head-minus-letters difference and its 95% CI as an error bar from the letters' accuracy.

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.

        Returns:
            The matplotlib ``Figure``.
        """
        figure, ax = axes_for(ax, (4.6, 4.0))
        conditions = [(f"{self.head}\n({self.method})", self.test_accuracy), ("letter logits", self.letter_accuracy),
                      ("random head\n(mean)", self.random_head_accuracy)]
        difference_bars(ax, conditions, reference=self.letter_accuracy, compared=0, difference=self.difference,
                        ci=(self.ci_low, self.ci_high), ylabel="held-out accuracy", reference_label="letter logits")
        low, high = ax.get_ylim()
        ax.set_ylim(min(0.0, low), max(1.0, high))  # a share, unless the interval reaches past it
        ax.set_title(f"{self.method}: {self.head} against the letters, p = {self.p_value:.3g}\n"
                     f"{self.n_test} held-out questions", fontsize=9)
        return finish(figure, path)


def compare(
    readout: OptionReadout, dev: Sequence[int], test: Sequence[int], methods: Sequence[str] = ("qk_end", "attention_end"),
    n_bootstrap: int = 2000, n_permutations: int = 5000, seed: int = 0,
) -> list[MethodComparison]:
    """For each method (:data:`METHODS`; ``"qk_end"``/``"attention_end"``: at the line end): the
    head with the best dev accuracy, its held-out accuracy against the letter logits (paired
    bootstrap CI of the difference, sign-flip permutation p-value) and the mean held-out accuracy
    of all heads."""
    dev_rows, test_rows = torch.as_tensor(list(dev)), torch.as_tensor(list(test))
    letters = readout.letter_correct()[test_rows]
    results = []
    for method in methods:
        correct = readout.head_correct(method)
        head = _best_head(correct[dev_rows].mean(dim=0))
        chosen = correct[test_rows, head.layer, head.head]
        low, high = paired_bootstrap_ci(chosen - letters, n_bootstrap, seed)
        results.append(MethodComparison(
            method=method, head=str(head), dev_accuracy=float(correct[dev_rows, head.layer, head.head].mean()),
            test_accuracy=float(chosen.mean()), letter_accuracy=float(letters.mean()),
            difference=float((chosen - letters).mean()), ci_low=low, ci_high=high,
            p_value=paired_permutation_p(chosen - letters, n_permutations, seed),
            random_head_accuracy=float(correct[test_rows].mean()), n_test=len(test_rows),
        ))
    return results


def split_stability(
    readout: OptionReadout, n_dev: int, n_splits: int = 20, method: str = "qk_line_end", seed: int = 0
) -> dict[str, Any]:
    """Reselect the best head on ``n_splits`` random dev splits of ``n_dev`` questions: how often
    each head is chosen and its accuracy on the rest of that split."""
    correct = readout.head_correct(method)
    rng = random.Random(seed)
    chosen: Counter[str] = Counter()
    held_out = []
    for _ in range(n_splits):
        order = list(range(len(readout)))
        rng.shuffle(order)
        dev, test = torch.tensor(order[:n_dev]), torch.tensor(order[n_dev:])
        head = _best_head(correct[dev].mean(dim=0))
        chosen[str(head)] += 1
        held_out.append(float(correct[test, head.layer, head.head].mean()))
    return {"method": method, "n_splits": n_splits, "chosen": dict(chosen.most_common()),
            "most_chosen_share": chosen.most_common(1)[0][1] / n_splits,
            "test_accuracy_mean": sum(held_out) / n_splits, "test_accuracy_min": min(held_out)}
