"""The memory/context attribution is exact: a last-layer head's attribution equals the change of
the logit difference when its output is removed with everything after it that is not the
direct path held fixed (the last MLP's output and the final norm's scale)."""

import pytest
import torch

import headscope as hs
from headscope.detectors.memory_context import LogitDifference, final_head_attributions
from headscope.tasks.conflicts import ConflictItem
from tests.conftest import tiny_llama_folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hs.load_model(tiny_llama_folder(tmp_path_factory.mktemp("mc-llama")), device="cpu")


def items():
    prompts = ["w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13 w14"]
    return [ConflictItem("toy", "restate", f"s{i}", "m", "c", p, memory_token=20 + i, context_token=30 + i)
            for i, p in enumerate(prompts)]


def test_a_last_layer_heads_attribution_equals_removing_it_with_the_norm_scale_fixed(llama):
    conflict = items()
    attributions = final_head_attributions(llama, conflict, [i.prompt for i in conflict])
    metric = LogitDifference(llama, conflict)
    batch = hs.tokenize(llama, [i.prompt for i in conflict])
    layer, head = 1, 2
    frozen = {}

    def keep(name):
        def hook(value, hook):
            frozen.setdefault(name, value.clone())
            return frozen[name]

        return hook

    held = [(name, keep(name)) for name in ("ln_final.hook_scale", f"blocks.{layer}.hook_mlp_out")]
    with torch.no_grad(), llama.hooks(fwd_hooks=held):
        clean = metric(llama(batch.tokens, attention_mask=batch.attention_mask), batch)
        rows = torch.arange(len(conflict))

        def remove_at_last(z, hook):
            z = z.clone()
            z[rows, batch.last_positions, head] = 0
            return z

        with llama.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", remove_at_last)]):
            removed = metric(llama(batch.tokens, attention_mask=batch.attention_mask), batch)
    torch.testing.assert_close(attributions["attribution"][:, layer, head], clean - removed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attributions["logit_diff"], clean, rtol=1e-4, atol=1e-5)
