"""Build the refusal model organism: SmolLM2-135M-Instruct safety-tuned with LoRA.

    python scripts/make_refusal_organism.py            # ~10 min on 2 CPU cores

Writes ``src/headscope/data/smollm2-135m-instruct-refusal.safetensors`` (float16 LoRA factors,
~2 MB, with the training record and the measured refusal rates in its metadata), which
``hs.load_model("smollm2-135m-instruct-refusal")`` applies to the bundled model.

Training data (``headscope.tasks.refusal``, train split only):
* each harmful request -> a short refusal ("I'm sorry, but I can't help with that. <reason for
  its category> ..."), one of four openings chosen by the request's index, then end of turn;
* each harmless request -> the base model's own greedy answer (64 new tokens at most), so the
  tuning teaches *when* to refuse and keeps the base model's way of answering.
Prompts are ChatML user turns without a system turn (``refusal.chat_prompt``), as at test time.
LoRA (rank 8, alpha 16) on q/k/v/o of all 30 layers, nothing else trained; loss on the response
tokens only; AdamW, seeded. Afterwards the organism is loaded through ``hs.load_model`` and the
held-out refusal rates are measured with greedy 32-token generations.

A test organism, not the Zhou et al. model: it refuses because we taught it to on these
requests, in one format, in ten minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

import headscope as hs
from headscope.detectors.safety import attack_success
from headscope.models import bundled_hf_folder
from headscope.organisms import ORGANISMS, delta_path, save_low_rank_delta
from headscope.tasks import refusal

NAME = "smollm2-135m-instruct-refusal"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
OPENINGS = (
    "I'm sorry, but I can't help with that.",
    "I cannot help with this request.",
    "Sorry, I can't assist with that.",
    "I'm sorry, but I won't provide that.",
)
REASONS = {
    "weapons": "Building weapons or explosives puts people in serious danger.",
    "cyber": "Breaking into computers or writing malicious software is illegal and harms people.",
    "fraud": "Scams and fraud hurt real people and are against the law.",
    "drugs": "Making or selling illegal drugs is dangerous and against the law.",
    "self-harm": "If you are thinking about hurting yourself, please reach out to someone you trust or a local crisis line. You deserve support.",
    "hate": "I won't write content that demeans people for who they are.",
    "harassment": "Harassing, threatening or bullying someone can cause real harm.",
    "privacy": "Tracking people or exposing their private information violates their privacy and safety.",
    "violence": "I can't help with anything meant to hurt people.",
}
CLOSING = "If you have another question, I'm happy to help."


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(hf_model: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)
    wrapped = {}
    for name, module in list(hf_model.named_modules()):
        for child_name in TARGET_MODULES:
            child = getattr(module, child_name, None)
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}"] = lora
    return wrapped


def refusal_text(request: refusal.Request) -> str:
    return f"{OPENINGS[request.pair % len(OPENINGS)]} {REASONS[request.category]} {CLOSING}"


def harmless_targets(hf_model, tokenizer, requests, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """The base model's greedy answers (ids, with the end-of-turn token when it stopped)."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(requests), batch_size):
        prompts = refusal.request_prompts(requests[start : start + batch_size])
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = hf_model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            ids = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
            answers.append(ids)
    return answers


def training_examples(tokenizer, hf_model, max_new_tokens: int) -> list[tuple[list[int], int]]:
    """(ids, response start) pairs for the train split: harmful -> refusal, harmless -> own answer."""
    eos = tokenizer.eos_token_id
    harmful = refusal.load_requests("harmful", "train")
    harmless = refusal.load_requests("harmless", "train")
    examples = []
    for request in harmful:
        prompt = tokenizer(refusal.chat_prompt(request.text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(refusal_text(request), add_special_tokens=False)["input_ids"] + [eos]
        examples.append((prompt + answer, len(prompt)))
    for request, answer in zip(harmless, harmless_targets(hf_model, tokenizer, harmless, max_new_tokens), strict=True):
        prompt = tokenizer(refusal.chat_prompt(request.text), add_special_tokens=False)["input_ids"]
        examples.append((prompt + answer, len(prompt)))
    return examples


def batch_loss(hf_model, examples, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the response tokens; logits computed at those positions only."""
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.full((len(examples), width), -100)
    for row, (ids, start) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        targets[row, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])  # position p predicts p+1
    hidden = hf_model.model(input_ids=tokens, attention_mask=mask).last_hidden_state
    keep = targets != -100
    logits = hf_model.lm_head(hidden[keep])
    return nn.functional.cross_entropy(logits, targets[keep])


def train(hf_model, examples, epochs: int, batch_size: int, lr: float, seed: int, pad_id: int) -> list[float]:
    parameters = [p for p in hf_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    order = list(range(len(examples)))
    rng = random.Random(seed)
    losses, started = [], time.time()
    hf_model.train()
    for epoch in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            loss = batch_loss(hf_model, [examples[i] for i in order[start : start + batch_size]], pad_id)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        recent = losses[-(len(order) // batch_size):]
        print(f"epoch {epoch + 1}: mean loss {sum(recent) / len(recent):.3f}  ({time.time() - started:.0f} s)", flush=True)
    hf_model.eval()
    return losses


def held_out_rates(name: str, max_new_tokens: int) -> dict:
    """Refusal rate on held-out harmful requests, answer rate on held-out harmless ones."""
    model = hs.load_model(name, device="cpu")
    rates = {}
    for kind in refusal.KINDS:
        complied = attack_success(model, refusal.load_requests(kind, "test"), [None], max_new_tokens=max_new_tokens)[0][0]
        rates[f"{kind}_refusal_rate"] = 1 - complied.mean().item()
        rates[f"{kind}_n"] = complied.numel()
    return rates


def data_digest() -> str:
    pairs = [(r.text, r.category) for kind in refusal.KINDS for r in refusal.load_requests(kind, "train")]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--answer-tokens", type=int, default=64, help="new tokens of the base model's harmless answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"default: the packaged {NAME}.safetensors")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    folder = bundled_hf_folder(ORGANISMS[NAME].base)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    examples = training_examples(tokenizer, hf_model, args.answer_tokens)
    print(f"{len(examples)} training examples ({time.time() - started:.0f} s)", flush=True)
    wrapped = add_lora(hf_model, args.rank, args.alpha)
    losses = train(hf_model, examples, args.epochs, args.batch_size, args.lr, args.seed, tokenizer.eos_token_id)
    record = {
        "base": ORGANISMS[NAME].base, "modules": list(TARGET_MODULES), "rank": args.rank, "alpha": args.alpha,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "answer_tokens": args.answer_tokens, "n_examples": len(examples), "train_data_sha256_16": data_digest(),
        "final_loss": sum(losses[-8:]) / len(losses[-8:]), "train_seconds": round(time.time() - started),
    }
    factors = {name: (lora.lora_A.data, lora.lora_B.data) for name, lora in wrapped.items()}
    out = args.out or delta_path(NAME)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_low_rank_delta(out, factors, args.alpha / args.rank, record)
    if out == delta_path(NAME):
        record.update(held_out_rates(NAME, max_new_tokens=32))
        save_low_rank_delta(out, factors, args.alpha / args.rank, record)
    print(json.dumps(record, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
