"""Model organisms: a bundled model plus a small low-rank weight delta shipped with headscope.

An organism is built *for testing the library*, not to stand in for a paper's model. The one
shipped is ``"smollm2-135m-instruct-refusal"``: SmolLM2-135M-Instruct (which refuses almost
nothing) safety-tuned with LoRA on its attention projections to refuse the harmful requests of
``headscope.tasks.refusal``'s training split and answer the harmless ones. The delta is made by
``scripts/make_refusal_organism.py`` (about ten minutes on two CPU cores) and stored as
``headscope/data/<name>.safetensors`` (float16 factors, ~2 MB) with the training record in its
metadata. ``hs.load_model(name)`` loads the base model and adds ``scale * B @ A`` to each
listed weight before wrapping it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.errors import ModelNotAvailableError

DELTA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Organism:
    name: str
    base: str  # a bundled model name
    description: str


ORGANISMS: dict[str, Organism] = {
    "smollm2-135m-instruct-refusal": Organism(
        name="smollm2-135m-instruct-refusal",
        base="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct + a rank-8 LoRA delta on q/k/v/o of every layer, trained "
        "to refuse harmful requests (headscope.tasks.refusal, train split) and answer harmless ones; "
        "a test organism, not the paper's Llama-2-7b-chat",
    ),
}


def delta_path(name: str) -> Path:
    """Where the organism's delta ships inside the package."""
    return Path(str(resources.files("headscope") / "data" / f"{name}{DELTA_SUFFIX}"))


def save_low_rank_delta(
    path: Union[str, Path], factors: dict[str, tuple[Tensor, Tensor]], scale: float, record: dict[str, Any]
) -> None:
    """Save ``{module: (A [r, in], B [out, r])}`` as float16, with ``scale`` and a JSON record."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{module}.lora_A"] = a.detach().to(torch.float16).contiguous()
        tensors[f"{module}.lora_B"] = b.detach().to(torch.float16).contiguous()
    metadata = {"scale": repr(float(scale)), "record": json.dumps(record)}
    save_file(tensors, str(path), metadata=metadata)


def load_low_rank_delta(path: Union[str, Path]) -> tuple[dict[str, tuple[Tensor, Tensor]], float, dict]:
    """The factors, scale and training record saved by :func:`save_low_rank_delta`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = {key.rsplit(".lora_", 1)[0] for key in handle.keys()}
        factors = {name: (handle.get_tensor(f"{name}.lora_A").float(), handle.get_tensor(f"{name}.lora_B").float())
                   for name in sorted(names)}
    return factors, float(metadata.get("scale", "1.0")), json.loads(metadata.get("record", "{}"))


def weight_deltas(path: Union[str, Path]) -> dict[str, Float[Tensor, "out inp"]]:
    """``scale * B @ A`` for every module of a delta file."""
    return _weight_deltas(*load_low_rank_delta(path)[:2])


def _weight_deltas(factors: dict[str, tuple[Tensor, Tensor]], scale: float) -> dict[str, Tensor]:
    return {name: scale * b @ a for name, (a, b) in factors.items()}


def apply_low_rank_delta(hf_model: Any, path: Union[str, Path]) -> dict:
    """Add the delta to a Hugging Face model's weights in place; returns the training record."""
    modules = dict(hf_model.named_modules())
    factors, scale, record = load_low_rank_delta(path)
    with torch.no_grad():
        for name, delta in _weight_deltas(factors, scale).items():
            if name not in modules:
                raise ModelNotAvailableError(f"The delta {Path(path).name} changes '{name}', which this model lacks.")
            weight = modules[name].weight
            weight += delta.to(weight)
    return record


def check_organism_file(name: str) -> Path:
    path = delta_path(name)
    if not path.is_file():
        raise ModelNotAvailableError(
            f"The organism '{name}' needs its delta file {path}, which is missing; rebuild it with "
            f"`python scripts/make_refusal_organism.py` from the repository root."
        )
    return path


def head_delta_norms(model: Any, path: Union[str, Path]) -> dict[str, Float[Tensor, "layers heads"]]:
    """How much the tuning changed each head: Frobenius norms of the delta's slices.

    ``"q"`` and ``"o"``: the head's rows of ΔW_Q and columns of ΔW_O; ``"k"`` and ``"v"``: its
    KV group's rows (shared by the group's query heads); ``"total"``: the root of their squared
    sum. Module names follow Hugging Face Llama (``model.layers.L.self_attn.{q,k,v,o}_proj``).
    """
    from headscope.engine.heads import Head, kv_head, model_shape

    shape = model_shape(model)
    d_head = model.cfg.d_head
    deltas = weight_deltas(path)
    norms = {kind: torch.zeros(shape.n_layers, shape.n_heads) for kind in ("q", "k", "v", "o")}
    for layer in range(shape.n_layers):
        for kind in norms:
            delta = deltas.get(f"model.layers.{layer}.self_attn.{kind}_proj")
            if delta is None:
                continue
            for head in range(shape.n_heads):
                block = kv_head(model, Head(layer, head)) if kind in ("k", "v") else head
                rows = slice(block * d_head, (block + 1) * d_head)
                norms[kind][layer, head] = (delta[:, rows] if kind == "o" else delta[rows]).norm()
    norms["total"] = torch.stack([norms[k] ** 2 for k in ("q", "k", "v", "o")]).sum(0).sqrt()
    return norms
