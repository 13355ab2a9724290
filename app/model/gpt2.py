"""Import a GPT-2 checkpoint (Hugging Face layout, safetensors only) as an MTP checkpoint.

GPT-2 is a pre-norm transformer with learned positions, tanh-GELU and an LM head tied to the
token embedding, so with norm_position="pre" our trunk reproduces it weight for weight. Head 1
of the MTP head becomes GPT-2's LM head; heads 2..k are new and need fine-tuning.

Nothing is ever unpickled: a directory holding only pytorch_model.bin is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from torch import Tensor

from app.model.checkpoint import CheckpointError, read_json_object, resolve_dtype, save_checkpoint
from app.model.config import ConfigError, ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import EOT, Tokenizer

log = logging.getLogger(__name__)

HEAD_INIT_STD = 0.02  # the noise added to heads 2..k, at the usual GPT-2 init scale

# HF activation names -> our ModelConfig.gelu; gelu_new/gelu_fast/gelu_pytorch_tanh are all the tanh formula
_GELU = {"gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}

# our name under blocks.{i} -> GPT-2's name under h.{i}
_BLOCK_NAMES = {
    "ln1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln2": "ln_2",
    "ffn.fc": "mlp.c_fc",
    "ffn.proj": "mlp.c_proj",
}
# HF's Conv1D stores its weight as [in, out]; nn.Linear wants [out, in]
_CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
# causal-mask buffers that older transformers versions saved beside the weights; not parameters
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class GPT2ImportError(CheckpointError):
    """A GPT-2 directory that cannot be imported; the message names the file and the problem."""


def _field(hf_config: Any, name: str, default: Any) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def gpt2_config(hf_config: Any, k: int, max_seq_len: int | None = None) -> ModelConfig:
    """ModelConfig for a GPT-2 config (a transformers GPT2Config, or its config.json as a dict).

    max_seq_len defaults to n_positions and may only shrink it (the learned table has no rows
    beyond). Dropout is 0: the result serves or starts a fine-tune; the caller can raise it.
    Raises ConfigError for GPT-2 variants our blocks cannot reproduce.
    """
    n_embd = _field(hf_config, "n_embd", 768)
    n_positions = _field(hf_config, "n_positions", 1024)
    activation = _field(hf_config, "activation_function", "gelu_new")
    if activation not in _GELU:
        raise ConfigError(f"activation_function {activation!r} is not supported (one of {sorted(_GELU)})")
    # each of these changes the attention maths away from plain scaled dot-product attention
    if not _field(hf_config, "scale_attn_weights", True):
        raise ConfigError("scale_attn_weights=false is not supported")
    if _field(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("scale_attn_by_inverse_layer_idx=true is not supported")
    if _field(hf_config, "add_cross_attention", False):
        raise ConfigError("add_cross_attention=true is not supported")
    if max_seq_len is not None and isinstance(n_positions, int) and max_seq_len > n_positions:
        raise ConfigError(f"max_seq_len {max_seq_len} exceeds the checkpoint's n_positions {n_positions}")
    n_inner = _field(hf_config, "n_inner", None)
    return ModelConfig(
        vocab_size=_field(hf_config, "vocab_size", 50257),
        d_model=n_embd,
        n_layers=_field(hf_config, "n_layer", 12),
        num_heads=_field(hf_config, "n_head", 12),
        d_ff=n_inner if n_inner is not None else 4 * n_embd if isinstance(n_embd, int) else n_embd,
        k=k,
        dropout_rate=0.0,
        positional_encoding="learned",
        max_seq_len=max_seq_len if max_seq_len is not None else n_positions,
        norm_position="pre",
        gelu=_GELU[activation],
        bias=True,
        layer_norm_eps=float(_field(hf_config, "layer_norm_epsilon", 1e-5)),
    )


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return {name: tuple(t.shape) for name, t in MTPTransformer(cfg).state_dict().items()}


def _extra_heads(head1: Tensor, k: int, seed: int) -> Tensor:
    """Heads 2..k as copies of head 1 plus N(0, 0.02) noise: [(k - 1) * V, C].

    Starting from the unembedding rather than from random rows gives each new head GPT-2's
    output geometry (and its token frequencies) from step one, so fine-tuning only has to learn
    the shift by j - 1 tokens; the seeded noise keeps the heads distinct from head 1 and each other.
    """
    gen = torch.Generator().manual_seed(seed)
    copies = head1.repeat(k - 1, 1)  # [(k - 1) * V, C]
    return copies + torch.randn(copies.shape, generator=gen) * HEAD_INIT_STD


def convert_gpt2_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig, k: int, seed: int) -> dict[str, Tensor]:
    """Rename (and transpose) GPT-2 tensors into an MTPTransformer state dict, all float32.

    Accepts GPT2LMHeadModel names ("transformer.h.0...", optional "lm_head.weight") and bare
    GPT2Model names ("h.0..."). Head 1 is lm_head (tied to wte when absent) with zero bias;
    heads 2..k come from _extra_heads. Raises ValueError naming missing, unexpected or
    mis-shaped tensors.
    """
    if k != cfg.k:
        raise ValueError(f"k={k} but cfg.k={cfg.k}")
    src: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("transformer.")
        if not _BUFFER.fullmatch(name):
            src[name] = tensor.detach().to(torch.float32)
    expected = _expected_shapes(cfg)
    expected["head.proj.weight"] = (cfg.vocab_size, cfg.d_model)  # head 1 only; heads 2..k are built below
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []  # in GPT-2's names and shapes, as the file has them

    def take(ours: str, theirs: str, transpose: bool = False) -> None:
        if theirs not in src:
            missing.append(theirs)
            return
        used.add(theirs)
        tensor = src[theirs].t().contiguous() if transpose else src[theirs]
        if ours == "pos_emb.weight":
            tensor = tensor[: cfg.max_seq_len]  # [S, C]; a shorter context keeps the leading rows
        if tuple(tensor.shape) != expected[ours]:
            mismatched.append(f"{theirs} {tuple(src[theirs].shape)}")
        out[ours] = tensor

    take("tok_emb.weight", "wte.weight")  # [V, C]
    take("pos_emb.weight", "wpe.weight")
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            for param in ("weight", "bias"):
                transpose = param == "weight" and theirs in _CONV1D
                take(f"blocks.{i}.{ours}.{param}", f"h.{i}.{theirs}.{param}", transpose)
    take("ln_f.weight", "ln_f.weight")
    take("ln_f.bias", "ln_f.bias")
    take("head.proj.weight", "lm_head.weight" if "lm_head.weight" in src else "wte.weight")  # [V, C]; tied by default
    unexpected = sorted(set(src) - used)
    for problem, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mismatched)):
        if names:
            raise ValueError(f"{problem} tensors: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    head1 = out["head.proj.weight"]
    out["head.proj.weight"] = torch.cat([head1, _extra_heads(head1, k, seed)])  # [k * V, C]
    out["head.proj.bias"] = torch.zeros(k * cfg.vocab_size)  # GPT-2's LM head has no bias
    return out


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    data = read_json_object(path, GPT2ImportError)
    if data.get("model_type", "gpt2") != "gpt2":
        raise GPT2ImportError(f"{path}: model_type is {data['model_type']!r}, expected 'gpt2'")
    return data


def _weight_files(src: Path) -> list[Path]:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():  # sharded: save_pretrained splits large models across several files
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise GPT2ImportError(f"{index}: not a safetensors index ({exc})") from exc
        return [src / shard for shard in shards]
    pickled = [p.name for p in (src / "pytorch_model.bin", src / "pytorch_model.bin.index.json") if p.exists()]
    if pickled:
        raise GPT2ImportError(
            f"{src / pickled[0]}: pickled weights are never loaded; safetensors is required "
            "(re-save with save_pretrained(dir, safe_serialization=True) to get model.safetensors)"
        )
    raise GPT2ImportError(f"{single}: missing file (safetensors weights are required)")


def _read_weights(files: list[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise GPT2ImportError(f"{path}: missing file")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise GPT2ImportError(f"{path}: corrupt safetensors file ({exc})") from exc
    return state


def _byte_level_bpe(vocab: Path, merges: Path) -> HFTokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt, as the original repo ships it."""
    hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _read_tokenizer(src: Path) -> tuple[Tokenizer, Path]:
    path, vocab, merges = src / "tokenizer.json", src / "vocab.json", src / "merges.txt"
    try:
        if path.is_file():
            hf = HFTokenizer.from_file(str(path))
        elif vocab.is_file() and merges.is_file():
            path, hf = vocab, _byte_level_bpe(vocab, merges)
        else:
            raise GPT2ImportError(f"{path}: missing file (and no vocab.json + merges.txt pair to build it from)")
        # GPT-2's vocab.json lists <|endoftext|> as an ordinary token; registering it as special keeps
        # its id and makes encode() recognise it in text
        hf.add_special_tokens([EOT])
        return Tokenizer(hf), path
    except GPT2ImportError:
        raise
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise GPT2ImportError(f"{path}: cannot load tokenizer ({exc})") from exc


def import_gpt2(
    src_dir: str | Path,
    out_dir: str | Path,
    k: int = 4,
    seed: int = 0,
    dtype: str = "float32",
    max_seq_len: int | None = None,
) -> Path:
    """Convert a GPT-2 directory (config.json, model.safetensors, tokenizer) into our checkpoint at out_dir.

    The tokenizer is tokenizer.json, else vocab.json + merges.txt; <|endoftext|> is added if absent.
    Heads 2..k start as noisy copies of the LM head (seeded by seed). Returns out_dir.
    Raises GPT2ImportError naming the offending file.
    """
    resolve_dtype(dtype)  # fail before the slow part, not after it
    src = Path(src_dir)
    if not src.is_dir():
        raise GPT2ImportError(f"{src}: directory not found")
    config_path = src / "config.json"
    try:
        cfg = gpt2_config(_read_config(src), k, max_seq_len)
    except ConfigError as exc:
        raise GPT2ImportError(f"{config_path}: cannot map to a model config ({exc})") from exc
    weight_files = _weight_files(src)  # refuse pickled weights before anything else is read
    tokenizer, tok_path = _read_tokenizer(src)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GPT2ImportError(
            f"{tok_path}: tokenizer has {tokenizer.vocab_size} tokens, vocab_size is {cfg.vocab_size}"
        )
    hf_state = _read_weights(weight_files)
    try:
        state = convert_gpt2_state_dict(hf_state, cfg, k, seed)
    except ValueError as exc:
        named = weight_files[0] if len(weight_files) == 1 else src / "model.safetensors.index.json"
        raise GPT2ImportError(f"{named}: weights do not match {config_path.name} ({exc})") from exc
    del hf_state
    with torch.device("meta"):  # the converted tensors are assigned below, so skip random init
        model = MTPTransformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    report = {
        "imported_from": str(src.resolve()),
        "source_format": "gpt2",
        "k": k,
        "seed": seed,
        "extra_heads_init": f"copy of head 1 + N(0, {HEAD_INIT_STD}^2) noise; untrained",
        "parameters": model.num_params(),
    }
    out = save_checkpoint(out_dir, model.eval(), tokenizer, report=report, dtype=dtype)
    log.info("imported %s -> %s: %.2fM parameters, k=%d, %s", src, out, model.num_params() / 1e6, k, dtype)
    return out
