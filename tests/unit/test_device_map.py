"""Models split by a device map (``hs.load_model(..., device_map=...)``, ``engine.devices``): a tiny
Llama and a tiny Gemma 3 dispatched by accelerate with every layer offloaded, to the CPU or to disk
(parameters are placeholders on ``"meta"``, loaded for each call), give exactly the numbers of the
same weights on one device: logits, cached activations, detector scores, ablations, validation and
the exact ablation scan. No GPU here: the CPU stands in as accelerate's main device, so the offload
hooks run as they would for a model larger than its GPU."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.cli import main
from headscope.engine import masked_mean, next_token_losses
from headscope.engine.devices import input_device, is_split, readable_weights
from headscope.engine.heads import hook_name
from headscope.engine.runner import forward_with_cache
from headscope.engine.tokens import pad_rows
from tests.conftest import active_hooks
from tests.families import split_family_model, tiny_family_model, tiny_hf_model

FAMILIES = ["LlamaForCausalLM", "Gemma3ForCausalLM"]  # Gemma 3: tied output head, QK-norm, post-norms
SMALL = dict(n_sequences=4, block_len=8, n_repeats=3, n_validation_sequences=4)


def mean_loss(logits, batch):
    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(the model on one device, the same weights split across CPU and disk offload)."""
    family = request.param
    whole = hs.load_model(tiny_family_model(family, with_tokenizer=True))
    split = split_family_model(family, tmp_path_factory.mktemp("offload"), with_tokenizer=True)
    return whole, split


@pytest.fixture(scope="module")
def prompts(pair):
    torch.manual_seed(3)
    return pad_rows(pair[0], [torch.randint(2, 200, (n,)).tolist() for n in (12, 9, 12, 7)])  # padded on purpose


def test_the_split_model_is_offloaded_to_cpu_and_disk(pair):
    _, split = pair
    placement = split.original_model.hf_device_map
    assert is_split(split) and {"cpu", "disk"} <= set(placement.values())
    assert all(p.device.type == "meta" for p in split.parameters())  # nothing resident between calls
    assert input_device(split) == torch.device("cpu") and split.cfg.device == "cpu"  # not the embedding's "meta"
    assert hs.model_identity(split) == hs.model_identity(pair[0])  # offloaded weights hashed from their store


def test_logits_and_a_cached_run_equal_the_unsplit_model(pair, prompts):
    whole, split = pair
    names = [hook_name(layer, kind) for layer in range(2) for kind in ("z", "pattern")]
    names += ["blocks.1.hook_resid_pre", "ln_final.hook_scale"]
    with torch.no_grad():
        expected, expected_cache = forward_with_cache(whole, prompts, names)
        logits, cache = forward_with_cache(split, prompts, names)
    assert torch.equal(logits, expected)
    assert cache.keys() == expected_cache.keys() and all(torch.equal(cache[n], expected_cache[n]) for n in names)


def test_detector_scores_equal_the_unsplit_model(pair):
    whole, split = pair
    for detector in ("induction", "previous_token", "successor"):  # successor reads weights (effective OV)
        expected = hs.detect(whole, detector, progress=False, **({} if detector == "successor" else SMALL))
        scores = hs.detect(split, detector, progress=False, **({} if detector == "successor" else SMALL))
        assert torch.equal(scores.values.nan_to_num(), expected.values.nan_to_num()), detector
        assert torch.equal(scores.values.isnan(), expected.values.isnan())


def test_ablations_equal_the_unsplit_model_and_leave_it_as_it_was(pair, prompts):
    whole, split = pair
    with torch.no_grad():
        before = split(prompts.tokens, attention_mask=prompts.attention_mask)
        for method in ("zero", "mean", "resample"):
            with hs.ablate(whole, ["L0H1", "L1H2"], method=method, reference=prompts):
                expected = whole(prompts.tokens, attention_mask=prompts.attention_mask)
            with hs.ablate(split, ["L0H1", "L1H2"], method=method, reference=prompts):
                ablated = split(prompts.tokens, attention_mask=prompts.attention_mask)
            assert torch.equal(ablated, expected), method
        after = split(prompts.tokens, attention_mask=prompts.attention_mask)
    assert torch.equal(after, before) and active_hooks(split) == 0


def test_validation_and_the_exact_scan_equal_the_unsplit_model(pair, prompts):
    whole, split = pair
    scores = hs.detect(whole, "induction", progress=False, **SMALL)
    expected = hs.validate(whole, scores, k=2, n_random=2, n_bootstrap=200, progress=False)
    result = hs.validate(split, scores, k=2, n_random=2, n_bootstrap=200, progress=False)
    assert result.to_dict() == expected.to_dict()
    for skip_layers in (True, False):  # from each layer on (engine.partial), and whole runs
        expected_scan = hs.ablation_scan(whole, prompts, mean_loss, method="mean", batch_size=2, skip_layers=skip_layers)
        scan = hs.ablation_scan(split, prompts, mean_loss, method="mean", batch_size=2, skip_layers=skip_layers)
        assert torch.equal(scan.values, expected_scan.values), skip_layers
    assert active_hooks(split) == 0


def test_offloaded_weights_are_readable_inside_readable_weights_only(pair):
    whole, split = pair
    with readable_weights(split.unembed, split.blocks[1].attn):
        with readable_weights(split.unembed):  # re-entrant: the inner block does not drop them
            pass
        assert torch.equal(split.W_U, whole.W_U) and torch.equal(split.blocks[1].attn.W_O, whole.blocks[1].attn.W_O)
    assert split.blocks[1].attn.o.weight.device.type == "meta"  # offloaded again afterwards


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split-llama")
    hf_model, tokenizer = tiny_hf_model("LlamaForCausalLM", with_tokenizer=True)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
       "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("placement", [dict(device_map=MAP), dict(device_map="auto", max_memory={"cpu": "400KB"})])
def test_load_model_splits_a_saved_folder_and_gives_the_same_numbers(llama_folder, placement, tmp_path):
    whole = hs.load_model(llama_folder, device="cpu")
    split = hs.load_model(llama_folder, offload_folder=tmp_path / "offload", **placement)
    assert {"cpu", "disk"} <= set(split.original_model.hf_device_map.values())
    tokens = torch.randint(2, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split(tokens), whole(tokens))
    assert hs.model_identity(split) == hs.model_identity(whole)


@pytest.mark.parametrize("arguments, message", [
    (dict(device_map="autoo"), "not a strategy accelerate knows.*Did you mean 'auto'"),
    (dict(device_map={"model.layers.0": "gpu"}), "a place is a GPU index, 'cpu' or 'disk'"),
    (dict(device_map={"model.layerz": "cpu"}), "names no module of this model: 'model.layerz'"),
    (dict(device_map={"model.embed_tokens": "cpu"}), "leaves parameters unplaced"),
    (dict(device="cpu", device_map="auto"), "device='cpu' and device_map are both given"),
    (dict(max_memory={"cpu": "1GB"}), "max_memory is given but device_map is not"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), r"max_memory\['cpu'\] = 'lots' is not a size"),
])
def test_a_bad_placement_is_one_clear_error(llama_folder, arguments, message):
    with pytest.raises(hs.ArgumentError, match=message):
        hs.load_model(llama_folder, **arguments)


def test_the_cli_checks_the_device_map_before_loading(llama_folder, capsys):
    for flags, message in ((["--device-map", "sequentail"], "--device-map: device_map='sequentail'.*'sequential'"),
                           (["--device", "cpu", "--device-map", "auto"], "--device cpu and --device-map are both"),
                           (["--offload-folder", "x"], "--offload-folder only applies to a model split"),
                           (["--device-map", "auto", "--max-memory", "cpu"], "'cpu' is not PLACE=SIZE"),
                           (["--device-map", "{oops"], "--device-map: the JSON value is not valid JSON")):
        assert main(["info", "--model", str(llama_folder), *flags]) == 2
        error = capsys.readouterr().err
        assert error.startswith("headscope: error: ") and "Traceback" not in error
        assert __import__("re").search(message, error), error
    assert main(["info", "--model", str(llama_folder), "--device-map", "auto", "--max-memory", "cpu=400KB"]) == 0
    assert "device map   cpu: 2 modules, disk: 4 modules" in capsys.readouterr().out
