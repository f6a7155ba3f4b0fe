"""A tiny model trained in seconds on repeated sequences forms an induction head, and
``hs.detect`` finds it (recipe measured for this 2-core CPU: ~12-15 s, seeds 0-6 all form one)."""

import pytest
import torch
import torch.nn.functional as F

import headscope as hs
from tests.conftest import tiny_model

VOCAB, BOS = 64, 0
TASK = dict(n_sequences=64, block_len=12, n_repeats=2, n_validation_sequences=64)


def training_batch(batch, min_len, max_len, generator):
    """Random tokens whose first ``n`` tokens repeat once (``n`` varies per row, so no fixed
    offset can solve it), and a mask of the targets inside the repeat."""
    width = 1 + 2 * max_len
    tokens = torch.randint(1, VOCAB, (batch, width), generator=generator)
    tokens[:, 0] = BOS
    n = torch.randint(min_len, max_len + 1, (batch, 1), generator=generator)
    index = torch.arange(width)[None]
    repeat = (index > n) & (index <= 2 * n)
    return tokens.gather(1, torch.where(repeat, index - n, index)), repeat[:, 1:]


def train_induction_model(seed=0, steps=700, lr=3e-3):
    model = tiny_model(n_layers=2, n_heads=4, d_vocab=VOCAB, seed=seed, rotary=True)
    model.cfg.bos_token_id = BOS
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast as 2 threads at this size, and steadier on a busy machine
    try:
        for _ in range(steps):
            tokens, repeat = training_batch(32, 4, 18, generator)
            losses = F.cross_entropy(model(tokens)[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
            loss = losses[repeat].mean() + 0.1 * losses[~repeat].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained():
    return train_induction_model()


def test_detect_finds_the_induction_head_that_training_formed(trained):
    untrained = tiny_model(n_layers=2, n_heads=4, d_vocab=VOCAB, seed=0, rotary=True)
    untrained.cfg.bos_token_id = BOS
    before = hs.detect(untrained, "induction", **TASK)
    after = hs.detect(trained, "induction", **TASK)
    best = after.top(1)[0]
    print("untrained max", float(before.values.max()), "trained", after.top(4))
    assert best.layer == 1  # an induction head needs a previous-token head below it
    assert best.score > 0.5
    assert float(before.values.max()) < 0.15
    assert float(after.values[0].max()) < 0.2  # layer 0 cannot do prefix matching alone


def test_the_trained_model_copies_in_context(trained):
    """Sanity of the recipe: loss on the repeat is far below chance, before it is at chance."""
    task = hs.get_detector("induction", **TASK).validation_task(trained)
    with torch.no_grad():
        repeated_loss = task.metric(trained(task.data), hs.TokenBatch(task.data, torch.ones_like(task.data)))
    print("loss on repeated tokens", float(repeated_loss.mean()), "chance", float(torch.log(torch.tensor(63.0))))
    assert float(repeated_loss.mean()) < 0.25 * float(torch.log(torch.tensor(63.0)))


def word_tokenizer():
    """A word-level tokenizer whose ids are the trained model's: ``<s>`` is 0, ``w1``..``w63``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<s>"] + [f"w{i}" for i in range(1, VOCAB)]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w1"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="w1")


def phrase_text(n_words, seed):
    """Words of the model's vocabulary in which phrases of 4-10 words recur at irregular
    distances, as names and phrases recur in prose."""
    generator = torch.Generator().manual_seed(seed)
    words = []
    while len(words) < n_words:
        if len(words) > 20 and torch.rand(1, generator=generator) < 0.5:
            start = int(torch.randint(0, len(words) - 10, (1,), generator=generator))
            words += words[start : start + int(torch.randint(4, 11, (1,), generator=generator))]
        else:
            words += [f"w{int(i)}" for i in torch.randint(1, VOCAB, (8,), generator=generator)]
    return " ".join(words[:n_words])


def test_the_trained_induction_head_is_also_found_on_the_researchers_own_text(trained, tmp_path):
    """``data=<text file>``: prefix matching read from the text's own repeats picks the head that
    the repeated-random-token task picks, far above its random-token null; on held-out windows the
    model predicts the induction-predictable tokens far better than chance, and zero-ablating the
    head costs loss there. (Top-vs-random is no test in this model: training made all four
    layer-1 heads induction heads, 0.71-0.77 on random tokens, so a random head is one too.)"""
    trained.tokenizer = word_tokenizer()
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(f'{{"text": "{phrase_text(400, seed)}"}}' for seed in range(4)))
    settings = dict(data=str(path), text_length=60, n_sequences=8, n_validation_sequences=8)
    try:
        on_random = hs.detect(trained, "induction", **TASK).top(1)[0]
        on_text = hs.detect(trained, "induction", **settings)
        (significance,) = hs.get_detector("induction", **settings).significance(trained, on_text)
        result = hs.validate(trained, on_text, k=1, n_random=3, method="zero")
    finally:
        trained.tokenizer = None
    best = on_text.top(1)[0]
    print("text", on_text.top(3), "null", significance.threshold, result.to_dict())
    assert (best.layer, best.head) == (on_random.layer, on_random.head)
    assert best.score > 0.3 and significance.threshold < 0.15 and bool(significance.mask[best.layer, best.head])
    assert on_text.config["data_sha256"] and on_text.metadata["n_sequences"] == 8
    chance = float(torch.log(torch.tensor(VOCAB - 1.0)))
    assert result.clean < 0.5 * chance and result.top_k > result.clean + 0.2
