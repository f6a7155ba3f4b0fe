"""Succession tasks: single-token filtering drops an item and both pairs it belongs to."""

from __future__ import annotations

import pytest

from headscope.errors import InputError
from headscope.tasks.succession import item_text, make_task, succession_tasks


class SplitsSomeWords:
    """A stand-in tokenizer: one token per word, except the listed texts, which take two."""

    def __init__(self, split=()):
        self.split, self.vocab = set(split), {}

    def __call__(self, text, add_special_tokens=False):
        token = self.vocab.setdefault(text, len(self.vocab))
        return {"input_ids": [token, token] if text in self.split else [token]}


def test_an_item_that_splits_takes_both_its_pairs_with_it():
    task = make_task(SplitsSomeWords({" Wednesday"}), "days")
    assert task.dropped_items == [" Wednesday"]
    assert task.dropped_pairs == 2 and len(task.pairs) == 5  # 7 wrapping pairs minus Tue→Wed and Wed→Thu
    assert (6, 0) in task.pairs  # Sunday → Monday wraps
    assert len(task.task_token_ids) == 6


def test_orderings_that_do_not_wrap_end_at_their_last_item():
    task = make_task(SplitsSomeWords(), "letters")
    assert len(task.pairs) == 25 and (25, 0) not in task.pairs


def test_forms_write_the_items_and_unknown_names_are_refused():
    assert [item_text("one", f) for f in ("space", "bare", "space_title", "space_upper")] == [" one", "one", " One", " ONE"]
    with pytest.raises(InputError, match="Unknown item form"):
        item_text("one", "shouting")
    with pytest.raises(InputError, match="Unknown succession task"):
        make_task(SplitsSomeWords(), "planets")


def test_tasks_without_a_pair_left_are_left_out():
    numbers = [" " + str(i) for i in range(1, 201)]
    tasks = succession_tasks(SplitsSomeWords(numbers), names=("numbers", "days"))
    assert [t.name for t in tasks] == ["days"]
