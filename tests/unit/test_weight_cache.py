"""The GGUF weight cache: every cached folder carries a manifest of sizes and XXH3-128 checksums,
checked on every load; a damaged folder is rebuilt from the GGUF file, never served.

A tiny 2-layer Llama GGUF (Q8_0 and F32 tensors, a byte-level BPE vocabulary of 58 tokens) is
written here with ``gguf.GGUFWriter``; ``transformers`` dequantises it in well under a second, so
no pretrained model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import headscope as hs
from headscope import models

TOKENS = torch.tensor([[0, 5, 6, 7, 30, 55, 3]])


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (4 query / 2 KV heads, width 32) with a byte-level BPE tokenizer,
    saved as GGUF: matrices in Q8_0, norms in F32."""
    import gguf

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<s>", "</s>", "Ġ", *letters, *("Ġ" + c for c in letters), "ab", "ba", "Ġab"]
    merges = [*(f"Ġ {c}" for c in letters), "a b", "b a", "Ġ ab"]
    vocab, width, ffn, heads, kv_heads, layers = len(tokens), 32, 64, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3] + [1] * (vocab - 2))  # 3: control, 1: normal
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(1)
    rng = np.random.default_rng(seed)
    kv_width = kv_heads * width // heads
    shapes = {"token_embd": (vocab, width), "output": (vocab, width)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_q": (width, width), f"blk.{i}.attn_k": (kv_width, width),
            f"blk.{i}.attn_v": (kv_width, width), f"blk.{i}.attn_output": (width, width),
            f"blk.{i}.ffn_gate": (ffn, width), f"blk.{i}.ffn_up": (ffn, width), f"blk.{i}.ffn_down": (width, ffn),
        })
    for name, shape in shapes.items():
        weights = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        quantised = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"{name}.weight", quantised, raw_shape=quantised.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name in ["output_norm", *(f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm"))]:
        writer.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def cached_folder(cache: Path) -> Path:
    (folder,) = (cache / "models").iterdir()
    return folder


def models_dir_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def reference(tiny_gguf, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A cache made by a first load of the tiny GGUF, and the logits of that load."""
    cache = tmp_path_factory.mktemp("reference-cache")
    return cache, logits(hs.load_model(tiny_gguf, device="cpu", cache_dir=cache))


@pytest.fixture
def cache(reference, tmp_path) -> Path:
    """A private copy of the reference cache, free to damage."""
    return Path(shutil.copytree(reference[0], tmp_path / "cache"))


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_middle(folder: Path) -> None:
    """Random bytes over 64 bytes in the middle of the weights; the size stays the same."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    noise = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()
    assert noise != bytes(data[middle:middle + 64])
    data[middle:middle + 64] = noise
    path.write_bytes(bytes(data))


def remove_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def remove_manifest(folder: Path) -> None:  # a cache made by an older headscope
    (folder / models.MANIFEST_NAME).unlink()


def add_stray_file(folder: Path) -> None:
    (folder / "stray.txt").write_text("not ours")


def garble_manifest(folder: Path) -> None:
    (folder / models.MANIFEST_NAME).write_text('{"format": 1, "files": ')


def other_algorithm(folder: Path) -> None:  # a manifest this version does not read
    path = folder / models.MANIFEST_NAME
    path.write_text(path.read_text().replace('"xxh3_128"', '"sha256"'))


DAMAGE = {
    "truncated": (truncate, r"model\.safetensors has \d+ bytes, checksums\.json says \d+"),
    "same-size-random-bytes": (overwrite_middle, r"checksum of model\.safetensors differs"),
    "missing-file": (remove_tokenizer, r"missing files: tokenizer\.json"),
    "no-manifest": (remove_manifest, r"no checksums\.json, so it cannot be verified"),
    "stray-file": (add_stray_file, r"does not list .*stray\.txt"),
    "garbled-manifest": (garble_manifest, r"checksums\.json is unreadable"),
    "other-algorithm": (other_algorithm, r"format 1 with 'sha256' checksums, which this headscope does not read"),
}


def test_a_cached_folder_lists_every_file_with_its_size_and_checksum(reference):
    import xxhash

    folder = cached_folder(reference[0])
    manifest = json.loads((folder / models.MANIFEST_NAME).read_text())
    assert manifest["format"] == 1 and manifest["algorithm"] == "xxh3_128"
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != models.MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "digest": xxhash.xxh3_128(data).hexdigest()}
    assert models.cache_folder_problem(folder) is None


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_found_from_the_manifest_without_loading_a_model(kind, cache, tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the check must not load a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    damage, reason = DAMAGE[kind]
    folder = cached_folder(cache)
    damage(folder)
    problem = models.cache_folder_problem(folder)
    assert problem is not None and re.search(reason, problem), problem
    assert not models._verified_or_discarded(folder, tiny_gguf)  # logged, moved aside, deleted
    assert models_dir_entries(cache) == []


@pytest.mark.parametrize("kind", ["truncated", "same-size-random-bytes", "missing-file", "no-manifest"])
def test_a_damaged_cache_is_rebuilt_and_gives_bit_identical_logits(kind, cache, reference, tiny_gguf, caplog):
    damage, reason = DAMAGE[kind]
    folder = cached_folder(cache)
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="headscope.models"):
        model = hs.load_model(tiny_gguf, device="cpu", cache_dir=cache)
    assert torch.equal(logits(model), reference[1])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder) in warning and "rebuilding it from" in warning
    assert re.search(reason, warning), warning
    assert models_dir_entries(cache) == [folder.name]  # nothing left aside, no staging folder
    assert models.cache_folder_problem(folder) is None


def test_same_size_damage_would_otherwise_change_the_model(cache, reference):
    """The damage the check catches is real: loaded as a plain folder, the weights differ."""
    folder = cached_folder(cache)
    overwrite_middle(folder)
    assert not torch.equal(logits(hs.load_model(folder, device="cpu")), reference[1])


def test_an_intact_cache_is_loaded_without_a_rebuild(cache, reference, tiny_gguf, monkeypatch):
    monkeypatch.setattr(models, "_dequantise_to_cache", lambda *a: pytest.fail("rebuilt an intact cache"))
    assert torch.equal(logits(hs.load_model(tiny_gguf, device="cpu", cache_dir=cache)), reference[1])


def test_a_rebuild_that_is_still_damaged_raises_and_names_the_folder(cache, tiny_gguf, monkeypatch):
    rebuild = models._dequantise_to_cache

    def rebuild_onto_a_bad_disk(path, target):
        rebuild(path, target)
        truncate(target)

    monkeypatch.setattr(models, "_dequantise_to_cache", rebuild_onto_a_bad_disk)
    folder = cached_folder(cache)
    truncate(folder)
    with pytest.raises(models.WeightCacheError, match=rf"{folder}.*still damaged.*Delete") as error:
        hs.load_model(tiny_gguf, device="cpu", cache_dir=cache)
    assert isinstance(error.value, hs.HeadscopeError)


def test_publish_keeps_the_folder_another_process_published_first(tmp_path):
    target, staging = tmp_path / "model", tmp_path / "model.staging"
    for folder, text in ((target, "theirs"), (staging, "ours")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    models._publish(staging, target)
    assert (target / "config.json").read_text() == "theirs" and not staging.exists()
    fresh = tmp_path / "fresh.staging"
    fresh.mkdir()
    models._publish(fresh, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and not fresh.exists()


def test_discard_leaves_a_folder_that_another_process_already_replaced(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    checked = models._identity(folder)
    os.rename(folder, tmp_path / "moved-by-another-process")
    models._discard(folder, checked)  # already gone: nothing to do
    folder.mkdir()  # the other process's rebuilt folder
    (folder / "config.json").write_text("rebuilt")
    models._discard(folder, checked)
    assert (folder / "config.json").read_text() == "rebuilt"
    models._discard(folder, models._identity(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved-by-another-process"]
