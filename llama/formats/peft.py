"""Hugging Face PEFT LoRA adapters <-> this project's LoRA tensors.

A PEFT LoRA adapter is a directory with `adapter_config.json` (`peft_type: LORA`, `r`,
`lora_alpha`, `target_modules` in HF names) and `adapter_model.safetensors` whose tensors are
named `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` and so on, so
`PeftModel.from_pretrained` on the HF copy of the base model loads what we export, and an
adapter trained with PEFT on an HF Llama runs here.

One layout difference matters: HF's q_proj/k_proj store each head's rows in rotate-half order
(all real parts, then all imaginary parts) where Meta interleaves the pairs. B's rows are
output features, so q/k lora_B rows move with the base rows on export and back on import;
A's rows are the rank dim and do not move.
"""

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from llama.errors import UserError
from llama.files import atomic_write, atomic_write_text, read_json
from llama.formats import hf
from llama.lora import TARGETS, targets_of
from llama.model import ModelArgs

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEARS = {path or "output" for path in TARGETS.values()}  # module paths that can hold an adapter


def base_key(key: str) -> str:
    """'layers.3.attention.wq.lora.A' -> 'layers.3.attention.wq.weight', the weight it adapts."""
    return key.rsplit(".lora.", 1)[0] + ".weight"


def peft_name(key: str) -> str:
    """'layers.3.attention.wq.lora.A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    factor = key.rsplit(".lora.", 1)[1]
    return f"{PREFIX}{hf.hf_name(base_key(key)).removesuffix('.weight')}.lora_{factor}.weight"


def our_name(name: str, path: Path) -> str:
    """The inverse of peft_name; a tensor that is not a LoRA factor of a Llama linear is a UserError."""
    bare = name.removeprefix(PREFIX)
    for factor in ("A", "B"):
        suffix = f".lora_{factor}.weight"
        meta = hf.meta_name(bare.removesuffix(suffix) + ".weight") if bare.endswith(suffix) else None
        if meta is not None and re.sub(r"^layers\.\d+\.", "", meta).removesuffix(".weight") in LINEARS:
            return f"{meta.removesuffix('.weight')}.lora.{factor}"
    raise UserError(f"{path}: tensor '{name}' is not a LoRA factor of a Llama linear layer this project knows")


def to_peft_layout(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """q/k lora_B rows into HF's rotate-half order (they are the base's output rows); A unchanged."""
    heads = hf.qk_heads(base_key(key), args) if key.endswith(".B") else None
    return hf.to_hf_rows(tensor, heads) if heads else tensor


def from_peft_layout(key: str, tensor: torch.Tensor, args: ModelArgs, path: Path) -> torch.Tensor:
    heads = hf.qk_heads(base_key(key), args) if key.endswith(".B") else None
    if not heads:
        return tensor
    if tensor.size(0) != heads * args.head_dim:
        raise UserError(f"{path}: '{key}' has {tensor.size(0)} rows but this model's layer has {heads * args.head_dim}: "
                        "the adapter is for another model")
    return hf.from_hf_rows(tensor, heads)


def save_peft_lora(full: Mapping[str, torch.Tensor], config: dict, args: ModelArgs, out_dir: Path) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (float32) for PEFT."""
    tensors = {peft_name(key): to_peft_layout(key, tensor, args).float().contiguous() for key, tensor in full.items()}
    targets = sorted({peft_name(key).removesuffix(".lora_A.weight").removesuffix(".lora_B.weight").rsplit(".", 1)[-1] for key in full})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.get("base_model", ""),
        "r": config["rank"], "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    # QLoRA: the base training saw, in the weights file's metadata (PEFT warns about unknown config keys)
    metadata = {"format": "pt", "base_quantization": config.get("base_quantization", "none")}
    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS, lambda f: f.write(safetensors_bytes(tensors, metadata=metadata)))
    atomic_write_text(json.dumps(peft_config, indent=2) + "\n", out_dir / CONFIG)
    return out_dir


def read_config(path: Path) -> dict:
    """adapter_config.json of a PEFT adapter directory (any type), checked to be a JSON object."""
    return read_json(Path(path) / CONFIG, "not a PEFT adapter directory")


def import_peft(path: Path, args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict]:
    """(full tensors in this project's names and layout, config) from a PEFT LoRA directory."""
    path = Path(path)
    config = read_config(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} is a {config.get('peft_type')} adapter, not LORA: pass a PEFT LoRA adapter (or use a prompt adapter as one)")
    for option, plain in (("use_dora", False), ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {})):
        if config.get(option, plain) not in (plain, None):
            raise UserError(f"{path}: PEFT option {option}={config[option]!r} is not supported (plain LoRA only)")
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path} has no {WEIGHTS}")
    try:
        tensors = load_safetensors(path / WEIGHTS)
        with safe_open(path / WEIGHTS, "pt") as weights:
            base_quantization = (weights.metadata() or {}).get("base_quantization", "none")
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path / WEIGHTS}: {err}") from None
    full = {}
    for name, tensor in tensors.items():
        key = our_name(name, path)
        full[key] = from_peft_layout(key, tensor, args, path)
    r = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(r) if config.get("use_rslora") else 1.0)  # rsLoRA scales by alpha / sqrt(r)
    ours_config = {"rank": r, "alpha": alpha, "dropout": config.get("lora_dropout", 0.0), "targets": targets_of(full),
                   "base_model": config.get("base_model_name_or_path", ""), "peft_config": config, "base_quantization": base_quantization}
    return full, ours_config
