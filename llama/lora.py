"""LoRA adapters on the tensor-parallel model: attach, gather, slice, save, load, merge.

The adapter of a layer lives inside its parallel linear (llama/parallel.py). Its tensors are
named after the layer, `layers.N.attention.wq.lora.A` / `.lora.B`, and split like it: the split
dims come from the base weight's entry in llama.checkpoint.SPLIT_DIMS (`lora_split_dims`), so
the table stays the one source of truth. Files always hold full (unsplit) tensors, so an
adapter trained on N ranks runs on any number of ranks.

Two file formats:
- the project's `adapter.pt`: `{"format": "llama-mp-lora", "config": {...}, "weights": {...}}`;
- Hugging Face PEFT's LoRA adapter directory (llama/peft_lora.py).
"""

import math
import sys
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.checkpoint import load_file, split_dim
from llama.errors import UserError, is_rank0
from llama.model import ModelArgs, Transformer
from llama.parallel import LoRA, ParallelLinear
from llama.prompt_tuning import atomic_torch_save

PROJECT_FORMAT = "llama-mp-lora"
# --lora_targets names -> the layer's module path in a block (None: the model's own `output`).
TARGETS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
           "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3", "output": None}
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def parse_targets(text: str | list[str]) -> list[str]:
    """'wq,wv' or a list -> checked target names, in the table's order."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise UserError(f"unknown LoRA target {unknown or names}: choose from {', '.join(TARGETS)} (comma-separated)")
    return [t for t in TARGETS if t in names]


def lora_split_dims(weight_key: str) -> tuple[Optional[int], Optional[int]]:
    """(A's, B's) split dim for the adapter of `weight_key`, from the base weight's split dim.

    Column-parallel base (split dim 0): A replicated, B split on dim 0. Row-parallel (split dim
    1): A split on dim 1, B replicated. A replicated base: both replicated.
    """
    base = split_dim(weight_key)
    return (1 if base == 1 else None), (0 if base == 0 else None)


def tensor_split_dim(key: str) -> Optional[int]:
    """Split dim of an adapter tensor `...wq.lora.A` (or of a base weight, for full fine-tuning)."""
    if ".lora." not in key:
        return split_dim(key)
    module, factor = key.rsplit(".lora.", 1)
    a_dim, b_dim = lora_split_dims(module + ".weight")
    return a_dim if factor == "A" else b_dim


def target_layers(model: Transformer, targets: list[str]) -> Iterator[tuple[str, ParallelLinear]]:
    """(module name, layer) of every targeted parallel linear, in model order."""
    for i, block in enumerate(model.layers):
        for name in targets:
            if TARGETS[name] is not None:
                yield f"layers.{i}.{TARGETS[name]}", block.get_submodule(TARGETS[name])
    if "output" in targets:
        yield "output", model.output


def local_slice(tensor: torch.Tensor, dim: Optional[int], rank: int, n_ranks: int) -> torch.Tensor:
    """Rank `rank`'s equal slice of a full tensor along dim (the whole tensor if dim is None)."""
    return tensor if dim is None else tensor.chunk(n_ranks, dim)[rank]


def add_lora(model: Transformer, targets: list[str], rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> None:
    """Give every targeted layer an adapter: B = 0 (the model is unchanged), A as PEFT draws it.

    PEFT initialises A with kaiming_uniform_(a=sqrt(5)) on the full [r, in] matrix. Every rank
    draws the full A from one CPU generator seeded alike and keeps its slice, so any TP layout
    starts from the same adapter. The base weights are frozen.
    """
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, layer in target_layers(model, targets):
        A = torch.empty(rank, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        attach(name, layer, A, torch.zeros(layer.out_features, rank), alpha, dropout)


def attach(name: str, layer: ParallelLinear, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0) -> None:
    """Put the adapter with full factors A [r, in], B [out, r] into `layer`, keeping this rank's slices."""
    rank, tp = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    if A.shape != (A.size(0), layer.in_features) or B.shape != (layer.out_features, A.size(0)):
        raise UserError(f"LoRA for '{name}' has A {tuple(A.shape)} and B {tuple(B.shape)}, but the layer is "
                        f"[{layer.out_features}, {layer.in_features}]: the adapter is for another model")
    a_dim, b_dim = lora_split_dims(name + ".weight")
    split_width = layer.out_features // tp if b_dim is not None else layer.in_features // tp
    if A.size(0) > split_width:
        raise UserError(f"--lora_rank {A.size(0)} exceeds the {split_width} features '{name}' holds on each of {tp} "
                        f"tensor-parallel ranks: use a rank of at most {split_width}")
    device = layer.weight.device if layer.quant is None else layer.quant.device
    layer.lora = LoRA(local_slice(A, a_dim, rank, tp).to(device), local_slice(B, b_dim, rank, tp).to(device), alpha, dropout,
                      replicated="A" if a_dim is None else "B")


def adapters(model: Transformer) -> dict[str, LoRA]:
    """Module name -> adapter, for every layer that has one."""
    return {name.removesuffix(".lora"): module for name, module in model.named_modules() if isinstance(module, LoRA)}


def local_state(model: Transformer) -> dict[str, torch.Tensor]:
    """This rank's adapter parameters by tensor name, `NAME.lora.A` and `NAME.lora.B`."""
    state = {}
    for name, lora in adapters(model).items():
        state[f"{name}.lora.A"], state[f"{name}.lora.B"] = lora.A, lora.B
    return state


def gather_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank: split ones all-gathered over the tensor-parallel group."""
    tp, group = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_group()
    full = {}
    for key, tensor in local_state(model).items():
        tensor, dim = tensor.detach(), tensor_split_dim(key)
        if dim is None or tp == 1:
            full[key] = tensor.cpu().clone()
            continue
        pieces = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        full[key] = torch.cat(pieces, dim).cpu()
    return full


def load_state(model: Transformer, full: Mapping[str, torch.Tensor], alpha: float, dropout: float = 0.0) -> None:
    """Attach adapters holding this rank's slices of the full tensors `full` (from a file); the base is frozen."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".lora.", 1)[0] for key in full})
    for name in names:
        layer = modules.get(name)
        if not isinstance(layer, ParallelLinear):
            raise UserError(f"adapter has weights for '{name}', which is not a linear layer of this model: the adapter is for another model")
        if f"{name}.lora.A" not in full or f"{name}.lora.B" not in full:
            raise UserError(f"adapter has only one of {name}.lora.A / {name}.lora.B")
        attach(name, layer, full[f"{name}.lora.A"].float(), full[f"{name}.lora.B"].float(), alpha, dropout)


def targets_of(full: Mapping[str, torch.Tensor]) -> list[str]:
    """The --lora_targets names an adapter's tensors cover."""
    paths = {key.rsplit(".lora.", 1)[0].split(".", 2)[-1] if key.startswith("layers.") else "output" for key in full}
    return [t for t, path in TARGETS.items() if (path or "output") in paths]


def save_adapter(full: Mapping[str, torch.Tensor], config: dict, path: Path) -> Path:
    """Write the project's format atomically: full tensors + config (rank, alpha, targets, base model)."""
    return atomic_torch_save({"format": PROJECT_FORMAT, "config": dict(config), "weights": dict(full)}, Path(path))


def load_adapter(path: Path, args: Optional[ModelArgs] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(full tensors, config) from adapter.pt or a PEFT LoRA directory (which needs the model's `args`)."""
    path = Path(path)
    if path.is_dir():
        from llama import peft_lora

        if args is None:
            raise ValueError("reading a PEFT adapter needs the model's args (for the q/k row order)")
        return peft_lora.import_peft(path, args)
    if not path.is_file():
        raise UserError(f"adapter {path} not found: pass an adapter.pt file or a PEFT adapter directory (train one with ft_main.py)")
    state = load_file(path, mmap=False)
    if not isinstance(state, dict) or state.get("format") != PROJECT_FORMAT:
        raise UserError(f"{path} is not a LoRA adapter written by ft_main.py (expected format '{PROJECT_FORMAT}')")
    return dict(state["weights"]), dict(state["config"])


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in float32 and returned in W's dtype."""
    return (weight.float() + scale * (B.float() @ A.float())).to(weight.dtype)


def adapter_kind(path: Path) -> str:
    """'lora' or 'prompt': what a file or PEFT directory holds (example_ft.py runs either)."""
    path = Path(path)
    if path.is_dir():
        from llama.peft_lora import read_config

        return "lora" if read_config(path).get("peft_type") == "LORA" else "prompt"
    if path.is_file():
        state = load_file(path, mmap=True)
        return "lora" if isinstance(state, dict) and state.get("format") == PROJECT_FORMAT else "prompt"
    return "prompt"  # load_prompt names the missing path


def apply_adapter(model: Transformer, path: Path) -> None:
    """Run a saved LoRA adapter (project or PEFT format) inside `model`, each rank its slices."""
    full, config = load_adapter(path, model.args)
    from llama.quantize import adapter_mismatch

    warning = adapter_mismatch(config, model)
    if warning and is_rank0():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    load_state(model, full, config["alpha"])


def merge_adapter(ckpt, path: Path):
    """Read checkpoint `ckpt` as base + scale * B @ A: its `read` of an adapted weight returns merged slices.

    Merging needs no gathering: a column-parallel slice is W_local + s * B_local @ A, a
    row-parallel one W_local + s * B @ A_local, so every writer (Meta N shards, HF, GGUF)
    streams the merged model one tensor at a time. Shapes are checked first.
    """
    full, config = load_adapter(path, ckpt.args)
    scale = config["alpha"] / config["rank"]
    factors = {}
    for module in sorted({key.rsplit(".lora.", 1)[0] for key in full}):
        key, A, B = module + ".weight", full.get(module + ".lora.A"), full.get(module + ".lora.B")
        if key not in ckpt.keys or A is None or B is None:
            raise UserError(f"adapter {path} has weights for '{module}', which {ckpt.path} does not have: the adapter is for another model")
        if key == "output.weight" and ckpt.tied:
            raise UserError(f"adapter {path} adapts the output layer, but {ckpt.path} ties it to the embedding: merge would change both")
        out_features, in_features = ckpt.shape(key)
        if A.shape != (A.size(0), in_features) or B.shape != (out_features, A.size(0)):
            raise UserError(f"adapter {path} has A {tuple(A.shape)}, B {tuple(B.shape)} for '{key}' of shape "
                            f"{(out_features, in_features)} in {ckpt.path}: the adapter's base model does not match")
        factors[key] = (A, B)
    base_read = ckpt.read

    def read(key: str, rank: int = 0, n_ranks: int = 1) -> torch.Tensor:
        weight = base_read(key, rank, n_ranks)
        if key not in factors:
            return weight
        (A, B), (a_dim, b_dim) = factors[key], lora_split_dims(key)
        return merged_weight(weight, local_slice(A, a_dim, rank, n_ranks), local_slice(B, b_dim, rank, n_ranks), scale)

    ckpt.read = read
    return ckpt
