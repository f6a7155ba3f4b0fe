"""Shared fixtures: tiny native models (fast) and the bundled pretrained model (loaded once).

Every test runs with the ``headscope`` package's annotations checked at run time: jaxtyping's
import hook wraps each function and dataclass of ``headscope`` in ``@jaxtyped(typechecker=
beartype.beartype)``, so a tensor whose shape or dtype disagrees with its ``Float[Tensor, "batch
pos"]`` annotation (or an argument of the wrong type) fails the test, and a dimension name means
one size within a call. beartype rather than typeguard: jaxtyping's documentation supports
typeguard 2 only (3 and 4, the venv has 4.6, have known issues with it), and beartype checks in
constant time per call (one item of a container, not every item). Set ``HEADSCOPE_TYPECHECK=0`` to run without the checks,
e.g. to time the tests or to tell a checking failure from a behaviour one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HEADSCOPE_RESULTS_CACHE" not in os.environ:  # results kept on disk (headscope.identity.stored_result) are
    # shared by this session's tests and notebook kernels, never by the next session's: each computes afresh
    import atexit
    import shutil
    import tempfile

    os.environ["HEADSCOPE_RESULTS_CACHE"] = tempfile.mkdtemp(prefix="headscope-test-results-")
    atexit.register(shutil.rmtree, os.environ["HEADSCOPE_RESULTS_CACHE"], ignore_errors=True)

TYPECHECK = os.environ.get("HEADSCOPE_TYPECHECK", "1") != "0"
HOOKED = any(type(finder).__name__ == "_JaxtypingFinder" for finder in sys.meta_path)  # this file runs
# twice, as conftest and as tests.conftest (tests import its helpers): the hook is installed once
if TYPECHECK and not HOOKED:  # before anything imports headscope: the hook only wraps modules imported after it
    if "headscope" in sys.modules:
        raise RuntimeError("headscope was imported before tests/conftest.py installed the type-checking import hook; "
                           "run pytest from the repository root, or set HEADSCOPE_TYPECHECK=0.")
    from jaxtyping import install_import_hook

    # is_pep484_tower: an int passes where a float is annotated, as PEP 484 (and mypy) allow
    install_import_hook("headscope", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.families import TEST_DEVICE  # noqa: E402  (HEADSCOPE_TEST_DEVICE: where the tiny models live)


def tiny_model(n_layers=2, n_heads=4, n_kv_heads=None, d_vocab=64, n_ctx=64, attn_only=True, seed=0, rotary=False):
    """A random TransformerBridge built natively by TransformerLens (no download, < 1 s)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)

    torch.manual_seed(seed)
    settings = dict(
        n_layers=n_layers, d_model=64, n_heads=n_heads, d_head=16, d_vocab=d_vocab, n_ctx=n_ctx,
        attn_only=attn_only, seed=seed, normalization_type="LN",
        positional_embedding_type="rotary" if rotary else "standard",
    )
    if n_kv_heads is not None:
        settings["n_key_value_heads"] = n_kv_heads
    if not attn_only:
        settings.update(d_mlp=128, act_fn="gelu")
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**settings))
    model.eval()
    return model.to(TEST_DEVICE) if TEST_DEVICE != "cpu" else model


def tiny_llama_folder(path):
    """A random 2-layer Llama with grouped-query attention and a word-level tokenizer, saved as a
    Hugging Face folder (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>"] + [f"w{i}" for i in range(62)]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_text_llama_folder(path, max_positions=1024):
    """A random 2-layer Llama (4 query heads on 2 KV heads) with the byte-level tokenizer of
    ``tests.families`` (every character a token, so any text runs), saved as a Hugging Face
    folder: what the CLI loads when a test scores its own text data (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.families import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def active_hooks(model) -> int:
    """Torch forward/backward hooks attached to the model's hook points (each counted once),
    plus any TransformerLens handle still registered."""
    unique = {id(point): point for point in model.hook_dict.values()}.values()
    torch_hooks = sum(len(p._forward_hooks) + len(p._backward_hooks) for p in unique)
    lens_handles = sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in unique)
    return max(torch_hooks, lens_handles)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def tiny_gqa():
    return tiny_model(n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct, loaded once per session."""
    import headscope as hs

    return hs.load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama (GQA, rotary, HF KV cache) loaded through hs.load_model."""
    import headscope as hs

    return hs.load_model(tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-session")), device=TEST_DEVICE)


PRETRAINED_FIXTURES = ("smollm",)
REPRO_DIR = Path(__file__).parent / "repro"


def pytest_configure(config):
    # beartype nags about typing.Sequence & co. (PEP 585); headscope keeps them for Python 3.10 style
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
    config.addinivalue_line("markers", "wrong_type: passes an argument of the wrong type on purpose, to test "
                                       "headscope's own error message; runs without the annotation checks")


def pytest_collection_modifyitems(config, items):
    """A test that loads a pretrained model belongs to the slow lane: mark it ``repro`` so that
    ``pytest -m "not repro"`` (the fast lane) never loads one, wherever the test lives; so is
    every test under tests/repro, marked or not."""
    for item in items:
        if item.path.is_relative_to(REPRO_DIR) or any(name in getattr(item, "fixturenames", ())
                                                       for name in PRETRAINED_FIXTURES):
            item.add_marker(pytest.mark.repro)


@pytest.fixture(autouse=True)
def no_pretrained_model_in_the_fast_lane(request, monkeypatch):
    """Outside the ``repro`` lane, reaching for a bundled pretrained model's weights (SmolLM2,
    Gemma 3, or an organism built on them) fails the test before anything loads: unit tests run on
    tiny random models. A missing model package still raises its own error first, so the tests of
    those messages stay in the fast lane."""
    if request.node.get_closest_marker("repro"):
        return
    from headscope import models

    locate = models._bundled_gguf

    def refuse(bundled, cache_dir):
        if any(bundled is known for known in models.BUNDLED_MODELS.values()):
            models._find_packages(bundled)  # ModelNotAvailableError when not installed
            pytest.fail(f"{request.node.nodeid} loads the bundled pretrained model {bundled.name!r} but is not marked "
                        "repro: use a tiny model (tests/families.py, tiny_model), or take the smollm fixture "
                        "(which marks the test repro).", pytrace=False)
        return locate(bundled, cache_dir)

    monkeypatch.setattr(models, "_bundled_gguf", refuse)


@pytest.fixture(autouse=True)
def annotations_unchecked_where_marked(request):
    """A ``wrong_type`` test runs with the annotation checks off: it tests the error a user gets
    (users run unchecked), which the checker would otherwise pre-empt with a TypeCheckError."""
    if not (TYPECHECK and request.node.get_closest_marker("wrong_type")):
        yield
        return
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture
def one_thread():
    """Small tensor ops in a loop (bootstraps, simulations) run several times faster on one thread
    than contending for many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
