"""The fast exact scan gives the naive loop's numbers on the bundled model (zero and mean ablation)."""

import pytest
import torch

import headscope as hs

pytestmark = pytest.mark.repro

HEADS = [(0, 0), (0, 4), (17, 3), (18, 6), (29, 1), (29, 8)]


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_scan_equals_one_forward_per_head_on_smollm(smollm, method):
    task = hs.get_detector("induction", n_validation_sequences=3, block_len=12, n_repeats=2).validation_task(smollm)
    naive = hs.naive_ablation_scan(smollm, task.data, task.metric, method=method, heads=HEADS, batch_size=3)
    fast = hs.ablation_scan(smollm, task.data, task.metric, method=method, heads=HEADS, batch_size=3,
                            positions=range(13, 24))
    scanned = ~torch.isnan(naive.values)
    print(method, {f"L{l}H{h}": round(float(fast.values[l, h]), 4) for l, h in HEADS})
    assert int(scanned.sum()) == len(HEADS)
    torch.testing.assert_close(fast.values[scanned], naive.values[scanned], rtol=0, atol=1e-4)
    assert float(naive.values[scanned].abs().max()) > 0.1  # the induction heads matter here
