"""The model's hyperparameters: a dataclass saved beside the weights (config.json) and loaded with them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

POSITIONAL_ENCODINGS = ("sinusoidal", "learned")
NORM_POSITIONS = ("post", "pre")
GELU_VARIANTS = ("exact", "tanh")
HEAD_TYPES = ("linear", "sequential")


class ConfigError(ValueError):
    """A model configuration that cannot describe a model."""


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    d_model: int = 256
    n_layers: int = 4  # N, the number of decoder blocks
    num_heads: int = 4
    d_ff: int = 1024
    k: int = 4  # number of MTP heads; head j predicts the token j steps ahead
    dropout_rate: float = 0.1
    positional_encoding: str = "sinusoidal"  # "sinusoidal" (fixed) or "learned"
    max_seq_len: int = 256
    norm_position: str = "post"  # "post" as specified; "pre" adds a final LayerNorm (GPT-2)
    gelu: str = "exact"  # "exact" (erf) or "tanh" (GPT-2's approximation)
    bias: bool = True
    layer_norm_eps: float = 1e-5
    # "linear": one Linear d_model -> k * vocab on the trunk's last state (a config without the
    # field is one); "sequential": DeepSeek-V3's MTP modules, one block per extra depth
    head_type: str = "linear"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "num_heads", "d_ff", "k", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        for name in ("dropout_rate", "layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        for name, allowed in (
            ("positional_encoding", POSITIONAL_ENCODINGS),
            ("norm_position", NORM_POSITIONS),
            ("gelu", GELU_VARIANTS),
            ("head_type", HEAD_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positional_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError("sinusoidal positions need an even d_model")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
