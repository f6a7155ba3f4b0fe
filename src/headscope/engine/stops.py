"""Stop bookkeeping shared by the greedy-decode loops (:mod:`~headscope.engine.decoding`,
:mod:`~headscope.engine.generation`): which rows have produced a stop token, and after how many
generated tokens each row ends."""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class StopTracker:
    """Rows of one batched greedy decode that have stopped.

    Attributes:
        stops: the stop token ids ``[n_stops]`` (CPU).
        finished: ``[rows]``, True once a row produced a stop token.
        lengths: ``[rows]``, tokens each row keeps: the step of its stop token, else ``max_new_tokens``.
    """

    def __init__(self, rows: int, max_new_tokens: int, stop_ids: Iterable[int]) -> None:
        self.stops: Int[Tensor, " n_stops"] = torch.tensor(sorted({int(i) for i in stop_ids}), dtype=torch.long)
        self.finished: Bool[Tensor, " rows"] = torch.zeros(rows, dtype=torch.bool)
        self.lengths: Int[Tensor, " rows"] = torch.full((rows,), max_new_tokens)

    def update(self, step: int, tokens: Int[Tensor, " rows"]) -> bool:
        """Record the tokens generated at ``step`` (0-based); True when every row has stopped."""
        stopping = torch.isin(tokens.cpu(), self.stops) & ~self.finished
        self.lengths[stopping] = step
        self.finished |= stopping
        return bool(self.finished.all())
