"""Typed configuration: options are parsed once, at the command-line edge (llama/cli.py), into frozen
dataclasses that are passed down whole.

`LoadSpec` says which model to load and how to build it on each rank. Training runs extend the same
idea (llama/tuning/config.py) and save theirs as readable JSON beside their outputs; `to_json` /
`from_json` convert any of these dataclasses, field by field, so a run saved before a new option
existed still reads (the new field takes its default).
"""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llama.errors import UserError
from llama.kernels.packed import PACKINGS
from llama.kernels.schemes import Scheme, parse_scheme, scheme_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: Optional[torch.dtype], device: torch.device) -> torch.dtype:
    """None ('auto') -> float32 on CPU (its kernels are fastest and exact there), bfloat16 on CUDA cards that support it."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


@dataclass(frozen=True)
class LoadSpec:
    """A model to load on this job's ranks, and how: the command-line options of the same names."""

    ckpt_dir: Path = Path("ckpts/stories260K")
    """Meta (params.json + consolidated.NN.pth) or Hugging Face (config.json + *.safetensors) folder."""
    tokenizer_path: Optional[Path] = None
    """None: <ckpt_dir>/tokenizer.model, else <ckpt_dir>/original/tokenizer.model."""
    max_seq_len: int = 512
    """Positions per sequence: the RoPE table and the KV cache (prompt + completion, or a training example)."""
    max_batch_size: int = 4
    """Rows of the KV cache: sequences decoded together (0: no KV cache, as training needs)."""
    dtype: Optional[torch.dtype] = None
    """Weights and compute; None: float32 on CPU, bfloat16 on a CUDA card that supports it."""
    quantize: Optional[Scheme] = None
    """Weight-only quantization of the block linears (and, under int8/int4, the output head in int8) while
    loading (llama/kernels), None: none."""
    rope_scaling_factor: Optional[float] = None
    """Llama 3.1+: override the RoPE scaling factor the checkpoint states."""
    verify: bool = False
    """Check every file's sha256 against the folder's manifest.json before loading (sizes are always checked)."""
    prepack: str = "auto"
    """Inference on a CPU, float32: the dense linears pre-packed for oneDNN or MKL (llama.kernels.packed.PackedLinear):
    auto (oneDNN at 2+ threads; at 1 thread MKL for the output head), none, onednn or mkl."""

    def __post_init__(self):
        if self.prepack not in PACKINGS:
            raise UserError(f"--prepack must be one of {', '.join(PACKINGS)}, got {self.prepack!r}")
        object.__setattr__(self, "ckpt_dir", Path(self.ckpt_dir))
        if self.tokenizer_path is not None:
            object.__setattr__(self, "tokenizer_path", Path(self.tokenizer_path))


def to_json(config: Any) -> Any:
    """A config dataclass as plain JSON values: paths and dtypes as text, schemes as --quantize spells them."""
    if isinstance(config, (Path, Scheme)):  # before the dataclass case: a Scheme is one too, but is written as text
        return str(config)
    if dataclasses.is_dataclass(config):
        return {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, torch.dtype):
        return dtype_name(config)
    if isinstance(config, tuple):
        return [to_json(v) for v in config]
    return config


def from_json(cls: type, data: dict, where: str = "config") -> Any:
    """The inverse of `to_json`; fields missing from `data` take their defaults, unknown ones are refused."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where} has unknown fields {unknown}: it was written by a newer version of llama-mp")
    return cls(**{name: _value(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _value(hint: Any, value: Any, where: str) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None or hint is Any:
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if hint is Scheme:  # before the dataclass case: a Scheme is one too, but is read from its --quantize text
        return parse_scheme(value)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, where)
    if hint is Path:
        return Path(value)
    if hint is torch.dtype:
        return None if value == "auto" else parse_dtype(value)
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


__all__ = ["DTYPES", "LoadSpec", "dtype_name", "from_json", "parse_dtype", "resolve_dtype", "scheme_name", "to_json"]
