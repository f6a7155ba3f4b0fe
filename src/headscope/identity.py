"""Which model a cached or saved result was computed on, and which metric: one identity for all.

Every cache, checkpoint and atlas part headscope keeps is keyed by a :class:`ModelIdentity`:

* ``model``: the model's name (``cfg.model_name``: the bundled name, the file's stem, the
  folder's name or the hub name);
* ``weights``: XXH3-128 of every parameter and buffer, in name order, each with its name, dtype
  and shape (the same algorithm as the weight cache's file checksums in ``headscope.models``);
* ``dtype``, and the versions of headscope, torch, transformer_lens and transformers.

A file written for another identity is never reused: :meth:`ModelIdentity.check_matches` raises
:class:`~headscope.errors.IdentityMismatchError` naming the fields that differ and the fix
(another path or folder, or starting over). An in-memory cache keeps values for the few most
recently used identities only (:class:`RecentCache`), so it neither grows without bound nor
hands back values computed before a weight edit.

**The weights hash is recomputed at every check, never cached.** A full hash of 135M float32
parameters (540 MB of random tensors) takes about 0.02 s on a 2-core CPU (XXH3 reads ~27 GB/s),
a few per cent of a single forward pass of such a model on a prompt batch, so each check
(a scan or needle checkpoint opened, an atlas run started, a cached mean or null looked up)
hashes the weights as they are then. Cheaper schemes are not correct: PyTorch's version counter
is not bumped by an edit through ``p.data`` (``p.data`` has a counter of its own), and
``data_ptr`` is reused by the CUDA allocator for a new tensor. headscope itself changes weights
only while loading (``load_model``: an organism's delta, a cast or a move), and every identity is
taken from the weights as they are at the check, so the identity follows any edit, ours or the
user's. On a GPU each tensor is copied to the host in chunks of 64 MiB: there is never a full
host copy of the model. The cost grows with the model: about 0.04 s per GB on the CPU; on a GPU
the chunked copies add the PCIe transfer.

**Metrics are identified only by an explicit** ``cache_key``: a metric (``metric(logits, batch)
-> [batch]``) with a ``cache_key`` attribute, a non-empty string that its author changes
whenever what the metric computes changes (the data it runs on is hashed separately), can be
checkpointed and cached. A name is not an identity (two closures of one function share a name
and differ in what they capture), so headscope never guesses: a scan refuses ``checkpoint=`` for
a metric without a ``cache_key`` (an ``ArgumentError`` saying how to add one), and
``validate(..., cache=...)`` runs such a metric's clean pass again instead of sharing it.

**Results kept on disk** (:func:`stored_result`): a costly value that is a pure function of the
model and of inputs that can be written down (select_copy's free-form knowledge check: the
prompts and the answers' first tokens) is kept in ``$HEADSCOPE_CACHE_DIR/results/<kind>/``
under a hash of the model's identity and those inputs, so another process (a rerun, the tests, a
notebook) reuses it. ``HEADSCOPE_RESULTS_CACHE`` names another folder, or ``off`` to keep none.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, TypeVar, Union

import torch
import xxhash
from torch import Tensor

from headscope.engine.devices import loaded, tied_copies
from headscope.errors import IdentityMismatchError, ResultFileError, ResultFileWarning
from headscope.files import atomic_torch_save
from headscope.models import cache_root, model_name
from headscope.versions import HEADSCOPE_VERSION, installed_version

CHUNK_BYTES = 1 << 26  # 64 MiB per host copy of a tensor on another device
SHOWN_DIGITS = 12  # of a weights hash in a message
V = TypeVar("V")


@dataclass(frozen=True)
class ModelIdentity:
    """What a result depends on besides its data: the model's name, its weights (a hash), its
    dtype and the versions of the libraries that compute the forward pass.

    Attributes:
        model: the model's name (``headscope.models.model_name``).
        weights: XXH3-128 (32 hex digits) of every parameter and buffer: name, dtype, shape, bytes.
        dtype: the dtype of the first parameter, e.g. ``"torch.float32"``.
        headscope, torch, transformer_lens, transformers: installed versions.
    """

    model: str
    weights: str
    dtype: str
    headscope: str
    torch: str
    transformer_lens: str
    transformers: str

    def to_dict(self) -> dict[str, str]:
        """The fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelIdentity":
        """The identity saved by ``to_dict``.

        Raises:
            ResultFileError: ``data`` is not a dict of the fields, each a string.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if (not isinstance(data, Mapping) or sorted(data) != sorted(names)
                or not all(isinstance(data[name], str) for name in names)):
            raise ResultFileError(f"not a model identity: expected a JSON object of the strings {', '.join(names)}; "
                                  f"got {data!r:.200}")
        return cls(**{name: data[name] for name in names})

    def differences(self, saved: "ModelIdentity") -> list[tuple[str, str, str]]:
        """``(field, saved value, this value)`` for each field where ``saved`` differs."""
        return [(f.name, getattr(saved, f.name), getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(saved, f.name) != getattr(self, f.name)]

    def check_matches(self, saved: Union["ModelIdentity", Mapping[str, Any], None], *, source: str, fix: str) -> None:
        """Refuse a file written for another model: raise unless ``saved`` is this identity.

        Args:
            saved: the identity stored in the file (a dict as ``to_dict`` writes it), or None when
                the file has none (written by an older headscope).
            source: the file, as the message names it, e.g. ``"The scan checkpoint out/scan.pt"``.
            fix: what to do instead, e.g. ``"pass another checkpoint path, or delete the file"``.

        Raises:
            IdentityMismatchError: naming each field that differs, both values, and ``fix``.
        """
        if saved is None:
            raise IdentityMismatchError(
                f"{source} records no model identity (an older headscope wrote it, or it was saved outside headscope's resumable runs), so it cannot be told apart from "
                f"another model's or other weights' results. headscope never reuses such results: {fix}.")
        if not isinstance(saved, ModelIdentity):
            saved = ModelIdentity.from_dict(saved)
        differences = self.differences(saved)
        if differences:
            listed = "; ".join(f"{name} {_shown(name, old)} there, {_shown(name, new)} here"
                               for name, old, new in differences)
            raise IdentityMismatchError(
                f"{source} was written for another model, other weights or other library versions ({listed}). "
                f"headscope never reuses results computed on another model or other weights: {fix}.")


def _shown(field: str, value: str) -> str:
    return f"{value[:SHOWN_DIGITS]}..." if field == "weights" else repr(value)


def model_identity(model: Any) -> ModelIdentity:
    """The identity of ``model`` as its weights are now (hashed afresh at every call: an edit
    made in place, also through ``p.data``, gives another identity)."""
    first = next(model.parameters(), None)
    return ModelIdentity(
        model=model_name(model),
        weights=weights_digest(model),
        dtype=str(first.dtype if first is not None else torch.float32),
        **_library_versions(),
    )


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    return {"headscope": HEADSCOPE_VERSION, "torch": str(torch.__version__),  # TorchVersion is no plain str
            "transformer_lens": installed_version("transformer-lens") or "not installed",
            "transformers": installed_version("transformers") or "not installed"}


def weights_digest(model: Any) -> str:
    """XXH3-128 (32 hex digits) of every parameter, then every buffer, each in name order with
    its name, dtype and shape before its bytes. Tied weights count once. Offloaded weights (a model
    split by a device map) are read from their store: a split model has the identity of the same
    weights on one device."""
    digest = xxhash.xxh3_128()
    copies = tied_copies(model)  # a split model's second placeholder of a tied weight
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in sorted(named, key=lambda item: item[0]):
            if name in copies:
                continue
            digest.update(f"{kind} {name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            _hash_bytes(digest, loaded(model, name, tensor))  # offloaded weights: read from their store
    return digest.hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """XXH3-128 of one tensor's dtype, shape and bytes (to key a value computed from it)."""
    digest = xxhash.xxh3_128(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode())
    _hash_bytes(digest, tensor)
    return digest.hexdigest()


def _hash_bytes(digest: Any, tensor: Tensor) -> None:
    """Feed the tensor's bytes to ``digest``; off the CPU, in host copies of ``CHUNK_BYTES``."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), CHUNK_BYTES):
        digest.update(flat[start:start + CHUNK_BYTES].cpu().numpy())  # no copy on the CPU


def metric_identity(metric: Any) -> Optional[str]:
    """The metric's ``cache_key`` (a non-empty string), or None: the metric cannot be identified,
    so nothing it computes may be checkpointed or cached (see the module's docstring)."""
    key = getattr(metric, "cache_key", None)
    return key if isinstance(key, str) and key else None


class RecentCache:
    """Values computed from a model, kept for the ``size`` most recently used keys only.

    Keys start with the model's :class:`ModelIdentity` (``(identity, settings...)``): a model
    whose weights changed gets a new key, and values of models no longer used fall out::

        _MEANS = RecentCache(size=4)
        means = _MEANS.get_or_set((model_identity(model), layers), lambda: compute(model))
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._values: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get_or_set(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The value kept under ``key``, else ``compute()`` kept under it (the least recently used
        key is dropped when more than ``size`` are kept)."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = compute()
        self._values[key] = value
        while len(self._values) > self.size:
            self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()


RESULTS_ENV_VAR = "HEADSCOPE_RESULTS_CACHE"  # a folder for stored results, or "off"


def results_folder() -> Optional[Path]:
    """Where :func:`stored_result` keeps values: ``$HEADSCOPE_RESULTS_CACHE``, else
    ``results/`` in the weight cache's folder; None when ``HEADSCOPE_RESULTS_CACHE=off``."""
    chosen = os.environ.get(RESULTS_ENV_VAR, "")
    if chosen.strip().lower() == "off":
        return None
    return Path(chosen).expanduser() if chosen else cache_root() / "results"


def stored_result(model: Any, kind: str, inputs: Any, compute: Callable[[], V]) -> V:
    """``compute()``, kept on disk under the model's identity and ``inputs`` and read back by any
    later call with both equal (see the module's docstring).

    Args:
        kind: a short name for the folder, e.g. ``"select_copy.known"``.
        inputs: everything besides the model that the value depends on, as JSON-ready data (the
            prompts themselves, not settings: a change to how prompts are built is then a new key).
        compute: makes the value (tensors, lists, numbers: what ``torch.load(weights_only=True)``
            reads).

    A file that cannot be read is warned about (``ResultFileWarning``) and written again, one
    that cannot be written is warned about and the value returned; files are written atomically,
    so processes sharing the folder never see a partial one.
    """
    folder = results_folder()
    if folder is None:
        return compute()
    key = _result_key(model_identity(model), kind, inputs)
    path = folder / kind / f"{key}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == key:
                return saved["value"]
            raise ValueError("its key does not match its name")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recomputed
            warnings.warn(f"The stored result {path} cannot be read ({type(exc).__name__}: {exc}); computing it again "
                          "and replacing it.", ResultFileWarning, stacklevel=2)
    value = compute()
    try:
        atomic_torch_save(path, {"key": key, "value": value})
    except OSError as exc:  # a read-only cache folder: the value is still good, it is just not kept
        warnings.warn(f"Could not keep the result in {path} ({exc}); set HEADSCOPE_RESULTS_CACHE to a writable folder, "
                      "or to off.", ResultFileWarning, stacklevel=2)
    return value


def _result_key(identity: ModelIdentity, kind: str, inputs: Any) -> str:
    text = json.dumps({"identity": identity.to_dict(), "kind": kind, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
