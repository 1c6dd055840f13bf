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
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from llama.errors import UserError
from llama.model import ModelArgs
from llama.prompt_tuning import atomic_write, atomic_write_text

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Meta module path in a block -> HF module path in a decoder layer.
HF_MODULES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
              "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
              "feed_forward.w3": "mlp.up_proj"}
PREFIX = "base_model.model."


def meta_to_hf_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows from Meta's interleaved pairs to HF's rotate-half order, per head."""
    rows, cols = tensor.shape
    return tensor.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_to_hf_rows."""
    rows, cols = tensor.shape
    return tensor.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _row_heads(module: str, args: ModelArgs) -> int:
    """Heads whose rows HF reorders in this module's output (0: none)."""
    return {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(module, 0)


def hf_name(key: str) -> str:
    """'layers.3.attention.wq.lora.A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    module, factor = key.rsplit(".lora.", 1)
    if module == "output":
        return f"{PREFIX}lm_head.lora_{factor}.weight"
    _, layer, path = module.split(".", 2)
    return f"{PREFIX}model.layers.{layer}.{HF_MODULES[path]}.lora_{factor}.weight"


def export_peft(full: Mapping[str, torch.Tensor], config: dict, args: ModelArgs, out_dir: Path) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (float32) for PEFT."""
    tensors = {}
    for key, tensor in full.items():
        module = key.rsplit(".lora.", 1)[0].split(".", 2)[-1]
        heads = _row_heads(module, args) if key.endswith(".B") else 0
        tensors[hf_name(key)] = (meta_to_hf_rows(tensor, heads) if heads else tensor).float().contiguous()
    targets = sorted({HF_MODULES[t].split(".")[1] if t in HF_MODULES else "lm_head"
                      for t in (key.rsplit(".lora.", 1)[0].split(".", 2)[-1] for key in full)})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.get("base_model", ""),
        "r": config["rank"], "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS, lambda f: f.write(safetensors_bytes(tensors, metadata={"format": "pt"})))
    atomic_write_text(json.dumps(peft_config, indent=2) + "\n", out_dir / CONFIG)
    return out_dir


def read_config(path: Path) -> dict:
    """adapter_config.json of a PEFT adapter directory (any type), checked to be a JSON object."""
    config_path = Path(path) / CONFIG
    if not config_path.is_file():
        raise UserError(f"{path} has no {CONFIG}: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object")
    return config


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
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path / WEIGHTS}: {err}") from None
    ours = {v: k for k, v in HF_MODULES.items()}
    full = {}
    for name, tensor in tensors.items():
        full[_our_name(name, ours, path)] = tensor
    for key in list(full):
        module = key.rsplit(".lora.", 1)[0].split(".", 2)[-1]
        heads = _row_heads(module, args) if key.endswith(".B") else 0
        if heads:
            if full[key].size(0) % (2 * heads):
                raise UserError(f"{path}: '{key}' has {full[key].size(0)} rows, not a multiple of 2 x {heads} heads: the adapter is for another model")
            full[key] = hf_to_meta_rows(full[key], heads)
    rank = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)  # rsLoRA scales by alpha / sqrt(r)
    from llama.lora import targets_of

    ours_config = {"rank": rank, "alpha": alpha, "dropout": config.get("lora_dropout", 0.0), "targets": targets_of(full),
                   "base_model": config.get("base_model_name_or_path", ""), "peft_config": config}
    return full, ours_config


def _our_name(name: str, ours: dict, path: Path) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> 'layers.3.attention.wq.lora.A'."""
    bare = name.removeprefix(PREFIX)
    for factor in ("A", "B"):
        suffix = f".lora_{factor}.weight"
        if bare.endswith(suffix):
            module = bare.removesuffix(suffix)
            if module == "lm_head":
                return f"output.lora.{factor}"
            parts = module.split(".")
            if len(parts) == 5 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in ours:
                return f"layers.{parts[2]}.{ours['.'.join(parts[3:])]}.lora.{factor}"
    raise UserError(f"{path}: tensor '{name}' is not a LoRA factor of a Llama linear layer this project knows")
