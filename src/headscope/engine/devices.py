"""Where a model's tensors live: on one device, or split across several by a device map.

A model loaded with ``device_map`` (``hs.load_model(..., device_map="auto")``: transformers and
accelerate place each layer on a GPU, on the CPU, or on disk) runs each module on its own
*execution device*. Accelerate moves activations between devices at module boundaries, so a hook
sees its activation on the device of the layer that made it. Modules offloaded to the CPU or to
disk keep only placeholders on ``"meta"`` and load their weights for the length of each call.

Everything headscope does that depends on placement asks this module, and only this module:

- :func:`input_device`: where token ids, masks and positions go (the input embedding's execution
  device), for one device and for a split model alike. The first parameter's device is wrong for
  a split model (it may sit on ``"meta"``). :func:`layer_device` and :func:`output_device`: where
  a block, and the unembedding (the logits), compute.
- :func:`readable_weights`: inside it, the weights of the given modules are real tensors on their
  execution devices (``W_U``, ``W_O``, norm weights read through the bridge), however the model
  was placed; outside, offloaded weights are placeholders again.
- :func:`placement`: the device map as loaded (``None`` on one device), for records and messages.

Anything a hook brings into an activation (means, vectors, patched activations) is moved with
``.to(activation)``, and a value read back out of a hook (a cache, a captured state) is on its
layer's device: code that combines several layers' values moves them to one device first.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch

from headscope.errors import UnsupportedModelError

_HELD: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def placement(model: Any) -> Optional[dict[str, Any]]:
    """The device map the model was dispatched with (module name → GPU index, ``"cpu"`` or
    ``"disk"``), or ``None`` for a model on one device."""
    original = getattr(model, "original_model", model)
    device_map = getattr(original, "hf_device_map", None)
    return dict(device_map) if device_map else None


def placement_counts(model: Any) -> Optional[dict[str, int]]:
    """How many device-map entries went to each place (``{"0": 20, "cpu": 6, "disk": 2}``), or
    ``None`` for a model on one device: a short record of how a split model ran."""
    device_map = placement(model)
    if device_map is None:
        return None
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def is_split(model: Any) -> bool:
    """True when the model was dispatched by a device map: across devices, or with modules offloaded
    to CPU or disk (whose parameters then sit on ``"meta"`` between calls)."""
    return placement(model) is not None


def input_device(model: Any) -> torch.device:
    """The device token ids must be on: the input embedding's execution device (for a model on one
    device, the device of its parameters)."""
    embed = _original(getattr(model, "embed", None))
    if embed is not None:
        device = execution_device(embed)
        if device is not None:
            return device
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def layer_device(model: Any, layer: int) -> torch.device:
    """Where block ``layer`` computes (its hooks' activations are there)."""
    return execution_device(model.blocks[layer]) or input_device(model)


def output_device(model: Any) -> torch.device:
    """Where the unembedding computes: the device logits come out on."""
    unembed = getattr(model, "unembed", None)
    found = execution_device(unembed) if unembed is not None else None
    return found or input_device(model)


def execution_device(module: torch.nn.Module) -> Optional[torch.device]:
    """Where ``module`` computes: its offload hook's execution device when accelerate gave it one,
    else the device of its first real parameter, else ``None``."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return _as_device(hook.execution_device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


@contextlib.contextmanager
def readable_weights(*modules: Any) -> Iterator[None]:
    """Inside, every offloaded parameter of ``modules`` (bridge components or plain modules, with
    their submodules) is loaded on its execution device, so weight reads such as ``model.W_U`` or
    ``block.attn.W_O`` give real values; forward passes inside keep those weights loaded. A no-op
    for modules that are not offloaded. Re-entrant; tensors read inside stay valid after it.

    Load only what is read: each module's weights take memory on its execution device (a GPU,
    when the model offloads to CPU or disk for lack of GPU memory) until the block ends.
    """
    held: list[tuple[torch.nn.Module, Any]] = []
    try:
        for module in modules:
            for sub in _offloaded(module):
                _hold(sub, held)
        yield
    finally:
        for sub, hook in reversed(held):
            _release(sub, hook)


def loaded(model: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the model's parameter or buffer ``name``), or, when it is an offloaded placeholder on
    ``"meta"``, its values loaded from the offload store (only that module's weights are loaded)."""
    if tensor.device.type != "meta":
        return tensor
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    with readable_weights(module):
        value = getattr(module, attribute)
    if value.device.type == "meta":
        raise UnsupportedModelError(f"{name} is on the meta device and no offload hook holds its values: the model was "
                           f"loaded without weights. Load it with its weights.")
    return value


def tied_copies(model: Any) -> set[str]:
    """Parameter names of a split model that repeat a tied weight (an output head tied to the
    embedding): accelerate gives each tied module a placeholder of its own, where the model on one
    device holds one shared parameter (``named_parameters`` lists it once). Empty for a model on one
    device."""
    if not is_split(model):
        return set()
    original = getattr(model, "original_model", model)
    tied = dict(getattr(original, "all_tied_weights_keys", None) or {})
    names = {_plain_name(name): name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {names[copy] for copy, source in tied.items() if copy in names and source in names}


def _plain_name(name: str) -> str:
    """A bridge parameter's name as the Hugging Face model spells it (without the bridge's
    ``_original_component`` steps)."""
    return ".".join(part for part in name.split(".") if part != "_original_component")


def _hold(module: torch.nn.Module, held: list) -> None:
    """Load ``module``'s offloaded weights (once, however many holders) and keep them loaded."""
    hook = next(hook for hook in _align_hooks(module) if hook.offload or _HELD.get(module))
    if not _HELD.get(module):
        hook.pre_forward(module)  # loads the weights on the execution device
        hook.offload = False  # calls inside neither reload nor drop them
    _HELD[module] = _HELD.get(module, 0) + 1
    held.append((module, hook))


def _release(module: torch.nn.Module, hook: Any) -> None:
    _HELD[module] -= 1
    if _HELD[module] == 0:
        del _HELD[module]
        hook.offload = True
        hook.post_forward(module, None)  # back to placeholders on "meta"


def _offloaded(module: Any) -> list[torch.nn.Module]:
    """``module`` and its submodules whose weights accelerate offloads (or that are held loaded)."""
    if not isinstance(module, torch.nn.Module):
        return []
    return [sub for sub in module.modules() if any(hook.offload or _HELD.get(sub) for hook in _align_hooks(sub))]


def _align_hooks(module: Any) -> list[Any]:
    """Accelerate's ``AlignDevicesHook`` objects on ``module`` (directly or in a ``SequentialHook``)."""
    hook = getattr(module, "__dict__", {}).get("_hf_hook")  # its own: a bridge component forwards lookups
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def _original(component: Any) -> Optional[torch.nn.Module]:
    """The Hugging Face module a bridge component wraps (itself for a plain module)."""
    if component is None:
        return None
    original = getattr(component, "_modules", {}).get("_original_component")
    return original if original is not None else component


def _as_device(device: Any) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def settle_device_config(model: Any) -> None:
    """For a split model, record in TransformerLens's ``cfg`` the input device and the number of
    execution devices (TransformerLens reads the first parameter's device, ``"meta"`` when the
    embedding is offloaded, and places masks it makes on ``cfg.device``)."""
    device_map = placement(model)
    if device_map is None:
        return
    original = getattr(model, "original_model", model)
    devices = {execution_device(original.get_submodule(name)) for name in device_map}
    model.cfg.device = str(input_device(model))
    model.cfg.n_devices = max(1, len(devices - {None}))
