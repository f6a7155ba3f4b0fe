"""Models split by a device map: every detector, an ablation, validation and the exact scan on a
split model against the same weights on one device, side by side (max difference, seconds, ratio).

Random tiny Llama and Gemma 3 models (``tests.families``: built from ``transformers`` configs, no
download), saved as Hugging Face folders and loaded three ways:

  whole       ``hs.load_model(folder, device=DEVICE)``: the reference.
  offload     ``hs.load_model(folder, device_map=...)``: on CUDA, layers on GPU 0, offloaded to the
              CPU and to disk (copied to the GPU at each call); on CPU, kept on the CPU and on disk.
  two-device  CUDA only: accelerate dispatches even layers to GPU 0 and odd ones to the CPU, where
              they also *run* (main device "cpu"): activations cross devices at every layer, as on
              a model split over several GPUs (one GPU machine has no second GPU to split onto).

Differences must be 0 where both runs compute on the same device (offload on CPU) and below
``--tolerance`` where CPU and GPU kernels meet. Exit status 1 when one is not.

    python benchmarks/device_map_check.py [--device cuda|cpu] [--families LlamaForCausalLM Gemma3ForCausalLM]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.families, from the repository root

import headscope as hs  # noqa: E402
from headscope.engine import masked_mean, next_token_losses  # noqa: E402
from headscope.engine.tokens import pad_rows  # noqa: E402
from tests.families import offloading_device_map, tiny_hf_model  # noqa: E402

DETECTORS = {  # small settings that score a random model (tests/unit/test_architectures.py)
    "induction": dict(n_sequences=4, block_len=8, n_repeats=3, n_validation_sequences=4),
    "previous_token": dict(n_sequences=4, block_len=8, n_repeats=3, n_validation_sequences=4),
    "successor": {},
    "copy_suppression": dict(tokens="all", n_tokens=40, text_length=24, n_sequences=2, n_validation_sequences=2),
    "name_mover": dict(names=tuple("ABCDEFGH"), n_prompts=8, n_validation=4),
    "select_copy": dict(n_questions=40, n_dev=10, only_known=False),
    "function_vector": dict(tasks=("letter_upper",), only_correct=False, n_prompts=2, n_mean_prompts=2,
                            n_validation_prompts=2),
    "truthfulness": dict(n_shuffles=1),
    "attention_sink": dict(text_length=16, n_sequences=4, n_validation_sequences=4),
    "safety": dict(n_queries=4, max_new_tokens=4),
    "retrieval": dict(lengths=(300,), depths=(0, 100), max_new_tokens=4, format="plain", rouge_threshold=-1.0),
}


def mean_loss(logits, batch):
    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


def saved_folder(family: str, root: Path) -> Path:
    hf_model, tokenizer = tiny_hf_model(family, with_tokenizer=True)
    folder = root / family
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def offload_map(folder: Path, device: str) -> dict[str, Any]:
    """Every other layer offloaded (to the CPU on a GPU machine, kept there on a CPU one), the
    embedding and the rest on disk or the main device."""
    from transformers import AutoModelForCausalLM

    device_map = offloading_device_map(AutoModelForCausalLM.from_pretrained(folder))
    if device == "cuda":  # the embedding (and a tied head) on the GPU, the rest as the test map says
        device_map = {name: (0 if where == "disk" and "layers" not in name else where)
                      for name, where in device_map.items()}
    return device_map


def two_device(folder: Path) -> Any:
    """Even layers on GPU 0, odd layers computing on the CPU (accelerate's main device "cpu")."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    device_map = {name: 0 for name in offloading_device_map(hf_model)}
    odd_layers = [name for name in device_map if name.startswith("model.layers.") and int(name.split(".")[2]) % 2]
    device_map.update({name: "cpu" for name in odd_layers})
    hf_model = dispatch_model(hf_model, device_map, main_device="cpu")
    bridge = build_bridge_from_module(hf_model, type(hf_model).__name__, hf_config=hf_model.config,
                                      tokenizer=AutoTokenizer.from_pretrained(folder))
    return hs.load_model(bridge)


def checks(model: Any) -> dict[str, Callable[[], Any]]:
    """What is compared: name -> a function of the model giving a tensor (or a dict of floats)."""
    torch.manual_seed(3)
    prompts = pad_rows(model, [torch.randint(2, 200, (n,)).tolist() for n in (12, 9, 12, 7)])

    def logits():
        with torch.no_grad():
            return model(prompts.tokens, attention_mask=prompts.attention_mask).float().cpu()

    def ablated():
        with hs.ablate(model, ["L0H1", "L1H2"], method="mean", reference=prompts):
            return logits()

    def validation():
        scores = hs.detect(model, "induction", progress=False, **DETECTORS["induction"])
        result = hs.validate(model, scores, k=2, n_random=2, n_bootstrap=200, progress=False)
        return torch.tensor([result.clean, result.top_k, result.random_k, result.difference])

    found = {"logits": logits, "ablate(mean)": ablated, "validate": validation,
             "ablation_scan": lambda: hs.ablation_scan(model, prompts, mean_loss, method="mean", batch_size=2).values}
    for name, settings in DETECTORS.items():
        found[name] = lambda name=name, settings=settings: hs.detect(model, name, progress=False, **settings).values
    return found


def compare(whole: Any, split: Any, label: str, tolerance: float) -> bool:
    ok = True
    reference, candidate = checks(whole), checks(split)
    print(f"\n{label}: {sorted(set(map(str, split.original_model.hf_device_map.values())))}")
    print(f"  {'check':<18} {'max |diff|':>11} {'whole s':>8} {'split s':>8} {'ratio':>6}")
    for name in reference:
        started = time.perf_counter()
        expected = reference[name]()
        middle = time.perf_counter()
        got = candidate[name]()
        ended = time.perf_counter()
        difference = float((got.float().cpu() - expected.float().cpu()).nan_to_num().abs().max())
        same_nan = bool(torch.equal(got.isnan().cpu(), expected.isnan().cpu()))
        flag = "" if difference <= tolerance and same_nan else "   <- differs"
        ok = ok and not flag
        print(f"  {name:<18} {difference:>11.3g} {middle - started:>8.2f} {ended - middle:>8.2f} "
              f"{(ended - middle) / max(middle - started, 1e-9):>6.1f}{flag}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--families", nargs="+", default=["LlamaForCausalLM", "Gemma3ForCausalLM"])
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference where CPU and GPU meet")
    args = parser.parse_args()
    torch.set_num_threads(1) if args.device == "cpu" else None
    ok = True
    with tempfile.TemporaryDirectory(prefix="headscope-device-map-") as root:
        for family in args.families:
            folder = saved_folder(family, Path(root))
            whole = hs.load_model(folder, device=args.device)
            split = hs.load_model(folder, device_map=offload_map(folder, args.device),
                                  offload_folder=Path(root) / f"{family}-offload")
            ok &= compare(whole, split, f"{family} offload", 0.0 if args.device == "cpu" else args.tolerance)
            if args.device == "cuda":
                ok &= compare(whole, two_device(folder), f"{family} two devices (GPU 0 + CPU)", args.tolerance)
    print("\nall equal" if ok else "\nSOME CHECKS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
