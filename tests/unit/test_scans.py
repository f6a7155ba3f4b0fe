"""Fast exact ablation scans equal the naive one-forward-per-head loop; attribution approximates them."""

import pytest
import torch

import headscope as hs
from headscope.engine import masked_mean, next_token_losses
from headscope.engine.tokens import pad_rows
from tests.conftest import active_hooks, tiny_model


def mean_loss(logits, batch):
    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=3, n_heads=4, n_kv_heads=2, attn_only=False)


@pytest.fixture(scope="module")
def prompts(model):
    torch.manual_seed(1)
    lengths = [19, 13, 20, 16, 20, 11]
    return pad_rows(model, [torch.randint(0, 64, (n,)).tolist() for n in lengths])  # padded on purpose


@pytest.mark.parametrize("method, factor", [("zero", None), ("mean", None), ("resample", None), ("uniform", None), ("scale", 2.5)])
def test_ablation_scan_equals_the_naive_loop(model, prompts, method, factor):
    naive = hs.naive_ablation_scan(model, prompts, mean_loss, method=method, factor=factor, batch_size=2)
    fast = hs.ablation_scan(model, prompts, mean_loss, method=method, factor=factor, batch_size=2)
    no_skip = hs.ablation_scan(model, prompts, mean_loss, method=method, factor=factor, batch_size=2, skip_layers=False)
    assert float(naive.values.abs().max()) > 1e-3  # the ablations do something
    torch.testing.assert_close(fast.values, naive.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(no_skip.values, naive.values, rtol=0, atol=1e-5)
    assert active_hooks(model) == 0


def test_a_subset_of_heads_leaves_the_others_nan(model, prompts):
    result = hs.ablation_scan(model, prompts, mean_loss, heads=[(2, 1), "L0H3"], batch_size=6)
    scanned = ~torch.isnan(result.values)
    assert scanned.sum() == 2 and scanned[2, 1] and scanned[0, 3]
    assert [tuple(h) for h in result.top_heads(5)] in ([(2, 1), (0, 3)], [(0, 3), (2, 1)])


def test_an_interrupted_scan_resumes_from_its_checkpoint(model, prompts, tmp_path):
    checkpoint = tmp_path / "scan.ckpt"
    calls, interrupt_at = [], [6]

    def flaky(logits, batch):
        calls.append(1)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        return mean_loss(logits, batch)

    flaky.cache_key = "mean_loss"  # the same metric, as far as the checkpoint is concerned
    with pytest.raises(KeyboardInterrupt):
        hs.ablation_scan(model, prompts, flaky, batch_size=2, checkpoint=checkpoint)
    assert checkpoint.is_file() and active_hooks(model) == 0
    done_before = len(torch.load(checkpoint, weights_only=True)["done"])
    assert 0 < done_before < 9
    calls.clear()
    interrupt_at[0] = -1
    resumed = hs.ablation_scan(model, prompts, flaky, batch_size=2, checkpoint=checkpoint)
    assert len(calls) < 9 * 2  # only the missing (chunk, layer) units ran
    complete = hs.ablation_scan(model, prompts, mean_loss, batch_size=2)
    torch.testing.assert_close(resumed.values, complete.values, rtol=0, atol=1e-6)


def keyed_loss(logits, batch):
    return mean_loss(logits, batch)


keyed_loss.cache_key = "mean next-token loss"


def test_a_checkpoint_of_another_chunk_size_or_reference_starts_over(model, prompts, tmp_path):
    """The saved units are (chunk, layer) pairs and the sums of a mean ablation depend on the
    means: resuming across another batch size or reference would count rows twice or mix means."""
    checkpoint = tmp_path / "scan.ckpt"
    calls = []

    def interrupted(logits, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return mean_loss(logits, batch)

    interrupted.cache_key = keyed_loss.cache_key
    with pytest.raises(KeyboardInterrupt):
        hs.ablation_scan(model, prompts, interrupted, batch_size=2, checkpoint=checkpoint)
    assert 0 < len(torch.load(checkpoint, weights_only=True)["done"])
    other_chunks = hs.ablation_scan(model, prompts, keyed_loss, batch_size=3, checkpoint=checkpoint)
    torch.testing.assert_close(other_chunks.values, hs.ablation_scan(model, prompts, keyed_loss, batch_size=3).values,
                               rtol=0, atol=1e-6)
    hs.ablation_scan(model, prompts, keyed_loss, method="mean", batch_size=2, checkpoint=checkpoint)
    other = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(7))
    resumed = hs.ablation_scan(model, prompts, keyed_loss, method="mean", reference=other, batch_size=2,
                               checkpoint=checkpoint)
    direct = hs.ablation_scan(model, prompts, keyed_loss, method="mean", reference=other, batch_size=2)
    torch.testing.assert_close(resumed.values, direct.values, rtol=0, atol=1e-6)


def test_a_checkpoint_with_a_damaged_identity_is_named_and_started_over(model, prompts, tmp_path):
    checkpoint = tmp_path / "scan.ckpt"
    complete = hs.ablation_scan(model, prompts, keyed_loss, batch_size=2, checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    torch.save(dict(state, identity={"model": "native"}), checkpoint)
    with pytest.warns(UserWarning, match=r"scan checkpoint .* cannot be read .*not a model identity"):
        again = hs.ablation_scan(model, prompts, keyed_loss, batch_size=2, checkpoint=checkpoint)
    torch.testing.assert_close(again.values, complete.values, rtol=0, atol=1e-6)


def test_attribution_scan_tracks_the_exact_effects_and_leaves_no_gradients(model, prompts):
    exact = hs.ablation_scan(model, prompts, mean_loss, method="scale", factor=0.9)
    estimate = hs.attribution_scan(model, prompts, mean_loss, method="scale", factor=0.9)
    correlation = torch.corrcoef(torch.stack([exact.values.flatten(), estimate.values.flatten()]))[0, 1]
    assert correlation > 0.95  # a 10% change is where a first-order estimate should be good
    assert all(p.grad is None for p in model.parameters())
    assert active_hooks(model) == 0


def test_bad_scan_arguments_fail_clearly(model, prompts):
    with pytest.raises(ValueError, match="zero, mean, resample, uniform, scale"):
        hs.ablation_scan(model, prompts, mean_loss, method="remove")
    with pytest.raises(ValueError, match="factor"):
        hs.ablation_scan(model, prompts, mean_loss, method="scale")
    with pytest.raises(hs.HeadIndexError):
        hs.ablation_scan(model, prompts, mean_loss, heads=[(3, 0)])


def test_unembedding_only_the_positions_the_metric_reads_gives_the_same_scan(model, prompts):
    def last_half_loss(logits, batch):
        losses = next_token_losses(logits, batch.tokens)[:, 6:]
        return masked_mean(losses, batch.attention_mask[:, 7:].bool())

    full = hs.ablation_scan(model, prompts, last_half_loss, batch_size=3)
    partial = hs.ablation_scan(model, prompts, last_half_loss, batch_size=3, positions=range(6, 19))
    torch.testing.assert_close(partial.values, full.values, rtol=0, atol=1e-5)
    assert active_hooks(model) == 0
