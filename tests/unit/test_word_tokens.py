"""Words as they stand in running text, for byte-level BPE and SentencePiece tokenizers alike: the
single-token checks of the IOI names, the in-context answers and copy suppression's word tokens."""

from __future__ import annotations

import pytest

from headscope.engine.tokens import spaced_token_texts, spaced_word_ids, spaced_word_token
from headscope.tasks.context_text import is_word_token
from tests.families import byte_tokenizer

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁a": 3, "▁Mary": 4, "▁pier": 5, "▁": 6, "▁gave": 7, "▁to": 8, "pier": 9}


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Metaspace tokenizer (words written '▁Mary', as Llama 2's and Mistral's are): decoding one
    such token alone gives 'Mary' without its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class LegacyDummyPrefix:
    """Llama 2's legacy SentencePiece behaviour: a text starting with a space gets the dummy prefix
    too, so ' Mary' alone is ['▁', '▁Mary'], while after a word it is '▁Mary'."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, add_special_tokens=False):
        ids = self.inner(text.lstrip(" "), add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": ([VOCAB["▁"]] if text.startswith(" ") else []) + ids}


def test_a_word_after_a_space_is_one_token_for_sentencepiece_and_byte_level(sentencepiece_like):
    legacy = LegacyDummyPrefix(sentencepiece_like)
    assert len(legacy(" Mary")["input_ids"]) == 2  # what a plain ' ' + word check would have dropped
    for tokenizer in (sentencepiece_like, legacy):
        assert spaced_word_token(tokenizer, "Mary") == spaced_word_token(tokenizer, " Mary") == VOCAB["▁Mary"]
    byte = byte_tokenizer()  # ' A' is one token of the tiny models' byte-level tokenizer, ' Ab' two
    assert spaced_word_token(byte, "A") == byte(" A", add_special_tokens=False)["input_ids"][0]
    assert spaced_word_token(byte, "Ab") is None and len(spaced_word_ids(byte, "Ab")) == 2


def test_word_tokens_read_with_their_space(sentencepiece_like):
    texts = spaced_token_texts(sentencepiece_like, [VOCAB["▁pier"], VOCAB["pier"], VOCAB["▁Mary"]])
    assert texts == [" pier", "pier", " Mary"]
    assert [is_word_token(text) for text in texts] == [True, False, True]
    byte = byte_tokenizer()
    ids = byte(" A", add_special_tokens=False)["input_ids"] + byte("b", add_special_tokens=False)["input_ids"]
    assert spaced_token_texts(byte, ids) == [" A", "b"]
