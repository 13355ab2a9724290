"""The training loop: corpus -> tokenizer -> split -> AdamW with warmup + cosine -> checkpoint.

Resumable (OUT/train_state holds fp32 weights, optimizer moments and RNG state, all in
safetensors + JSON) and seeded.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from app.training.data import TokenStream, read_corpus, split_text
from app.training.evaluate import evaluate_text
from app.training.loss import head_weights, mtp_loss
from app.training.report import write_plot

log = logging.getLogger(__name__)

STATE_DIR = "train_state"


@dataclass
class TrainConfig:
    corpus: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 16
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    head_weights: str | None = None  # e.g. "1,1,0.75,0.5"; None = equal (or mtp_weight's)
    mtp_weight: float | None = None  # DeepSeek-V3's λ: weights 1, λ/(k-1), ..; not with head_weights
    eval_interval: int = 250
    eval_windows: int = 40  # windows of held-out text per periodic evaluation
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # "auto": bf16 autocast where the device supports it, else fp32
    save_dtype: str = "float16"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = min((step - tc.warmup) / max(tc.steps - tc.warmup, 1), 1.0)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: MTPTransformer, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


def save_state(
    out: Path, model: MTPTransformer, opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict[str, Any]
) -> None:
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    sd = opt.state_dict()
    tensors = {f"model.{n}": t.detach().float().contiguous() for n, t in model.state_dict().items()}
    for pid, slots in sd["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{pid}.{key}"] = value.detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    save_file(tensors, str(state / "state.safetensors"))
    (state / "state.json").write_text(json.dumps({**meta, "param_groups": sd["param_groups"]}))


def load_state(out: Path, model: MTPTransformer, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, Any]:
    state = out / STATE_DIR
    tensors = load_file(str(state / "state.safetensors"))
    meta = json.loads((state / "state.json").read_text())
    model.load_state_dict({n[len("model.") :]: t for n, t in tensors.items() if n.startswith("model.")})
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            slots.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    return meta


def prepare_tokenizer(out: Path, train_text: str, vocab_size: int, resume: bool) -> Tokenizer:
    path = out / "tokenizer.json"
    if resume and path.is_file():
        return Tokenizer.from_file(path)
    tok = Tokenizer.train([train_text], vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def train(tc: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train from tc.corpus into tc.out; returns the report (also written to OUT/report.json)."""
    out = Path(tc.out)
    device = pick_device(tc.device)
    bf16 = use_bf16(tc.precision, device)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)

    train_text, val_text = split_text(read_corpus(tc.corpus))
    tok = prepare_tokenizer(out, train_text, tc.model.vocab_size, resume)
    tc.model.vocab_size = tok.vocab_size
    stream = TokenStream(tok.encode(train_text))
    model = MTPTransformer(tc.model).to(device)
    opt = make_optimizer(model, tc)
    weights = head_weights(tc.head_weights, tc.model.k, tc.mtp_weight).to(device)
    teacher_forced = tc.model.head_type == "sequential"

    history: list[dict[str, Any]] = []
    start_step, elapsed = 0, 0.0
    if resume and (out / STATE_DIR / "state.json").is_file():
        meta = load_state(out, model, opt, gen)
        start_step, elapsed, history = meta["step"], meta["elapsed_s"], meta["history"]
        log.info("resumed from step %d", start_step)

    tokens_per_step = tc.batch_size * tc.model.max_seq_len
    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps, disable=quiet, file=sys.stderr)
    t0 = time.perf_counter() - elapsed
    window_t, window_steps = time.perf_counter(), 0
    model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x, y = stream.sample(tc.batch_size, tc.model.max_seq_len, tc.model.k, gen, teacher_forced)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)  # [B, T, k, V]
        loss, heads = mtp_loss(logits, y, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        window_steps += 1
        if step % 10 == 0 or step == tc.steps - 1:
            rate = window_steps * tokens_per_step / (time.perf_counter() - window_t)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            window_t, window_steps = time.perf_counter(), 0
        last = step == tc.steps - 1
        if (step + 1) % tc.eval_interval == 0 or last:
            ev = evaluate_text(model, tok, val_text, max_windows=tc.eval_windows)
            history.append(
                {
                    "step": step + 1,
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                    "train_loss": [round(float(v), 4) for v in heads],
                    "val_loss": [round(v, 4) for v in ev["loss"]],
                    "val_top1": [round(v, 4) for v in ev["top1"]],
                    "val_bits_per_byte": round(ev["bits_per_byte"], 4),
                }
            )
            tqdm.write(json.dumps(history[-1]), file=sys.stderr)
            meta = {"step": step + 1, "elapsed_s": time.perf_counter() - t0, "history": history}
            save_state(out, model, opt, gen, meta)

    final = evaluate_text(model, tok, val_text)
    report = {
        "train_config": {**asdict(tc), "model": tc.model.to_dict()},
        "device": str(device),
        "bf16_autocast": bf16,
        "parameters": model.num_params(),
        "train_tokens": len(stream),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "history": history,
        "heldout": {
            "bits_per_byte": round(final["bits_per_byte"], 4),
            "loss": [round(v, 4) for v in final["loss"]],
            "top1": [round(v, 4) for v in final["top1"]],
            "tokens": final["tokens_scored"],
            "bytes": final["bytes"],
        },
    }
    save_checkpoint(out, model, tok, report=report, dtype=tc.save_dtype)
    write_plot(history, out / "report.png")
    return report
