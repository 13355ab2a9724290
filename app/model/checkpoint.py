"""Checkpoint directories: config.json, model.safetensors, tokenizer.json, report.json.

Weights are safetensors only; nothing is ever unpickled. Every failure names the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from app.model.chat import ChatTemplateError, load_chat_template
from app.model.config import ConfigError, ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "report.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def resolve_device(name: str | torch.device) -> torch.device:
    """ "auto" = CUDA if available, else CPU; the one place a device name is read."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name ("auto" = bfloat16 on CUDA, else float32); the one place a dtype name is read."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def resolve_kv_dtype(
    name: str, weights: torch.dtype, device: str | torch.device = "cpu", compiled: bool = True
) -> torch.dtype:
    """The KV caches' dtype. "auto": bfloat16 for float32 weights in compiled CPU steps, which
    read the cache in loops of their own and convert as they read, so half the bytes come from
    memory (docs/benchmarks.md, benchmark 59: held-out bits per byte the same to four decimals);
    elsewhere the weights' dtype: an eager step, or CUDA's attention kernel, would first copy
    the cache into the weights' dtype."""
    if name == "auto":
        cpu = resolve_device(device).type == "cpu"
        return torch.bfloat16 if compiled and cpu and weights == torch.float32 else weights
    return resolve_dtype(name, device)


def save_checkpoint(
    out_dir: str | Path,
    model: MTPTransformer,
    tokenizer: Tokenizer,
    report: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    store = resolve_dtype(dtype)
    tensors = {name: t.detach().to("cpu", store).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "dtype": str(store)})
    tokenizer.save(out / TOKENIZER_FILE)
    if report is not None:
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def read_json_object(path: Path, error: type[CheckpointError] = CheckpointError) -> dict[str, Any]:
    """A JSON object from a file; raises `error` naming the file when it is missing or not one."""
    if not path.is_file():
        raise error(f"{path}: missing file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def load_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    data = read_json_object(path)
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc
    try:
        tokenizer.chat_template = load_chat_template(ckpt_dir)
    except ChatTemplateError as exc:
        raise CheckpointError(str(exc)) from exc
    return tokenizer


def load_weights(path: Path, model: MTPTransformer) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from exc
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _check_tensors(path, {name: tuple(t.shape) for name, t in tensors.items()}, expected)
    model.load_state_dict(tensors)


def check_checkpoint(ckpt_dir: str | Path) -> ModelConfig:
    """Everything load_checkpoint checks except the weights' values: config, tokenizer, tensor names
    and shapes (from the safetensors header). Cheap; raises CheckpointError."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    cfg = load_config(root)
    _check_vocab(root, load_tokenizer(root), cfg)
    path = root / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from exc
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in MTPTransformer(cfg).state_dict().items()}
    _check_tensors(path, shapes, expected)
    return cfg


def _check_vocab(root: Path, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{root / TOKENIZER_FILE}: tokenizer has {tokenizer.vocab_size} tokens, "
            f"config vocab_size is {cfg.vocab_size}"
        )
    if tokenizer.vocab_size < cfg.vocab_size:  # e.g. an embedding padded to a multiple of 64
        log.warning(
            "the model has %d token ids, its tokenizer %d: ids %d.. have no text and decode as ''",
            cfg.vocab_size,
            tokenizer.vocab_size,
            tokenizer.vocab_size,
        )
        tokenizer.cover(cfg.vocab_size)


def _check_tensors(path: Path, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensor names do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {shape}, config expects {expected[name]}")


def load_checkpoint(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> tuple[MTPTransformer, Tokenizer]:
    """Load a checkpoint for inference (eval mode) on device in dtype."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    cfg = load_config(root)
    tokenizer = load_tokenizer(root)
    _check_vocab(root, tokenizer, cfg)
    model = MTPTransformer(cfg)
    load_weights(root / WEIGHTS_FILE, model)
    model.to(device=resolve_device(device), dtype=resolve_dtype(dtype, device)).eval()
    log.info("loaded %s: %.2fM parameters on %s in %s", root, model.num_params() / 1e6, device, dtype)
    return model, tokenizer
