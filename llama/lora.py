"""LoRA adapters on the tensor-parallel model: attach, gather, slice.

The adapter of a layer lives inside its parallel linear (llama/parallel.py), which says how its
factors split (`lora_split`: a column-parallel layer's B is split like its rows, a row-parallel
layer's A like its columns). Tensors are named after the layer, `layers.N.attention.wq.lora.A` /
`.lora.B`. Full (unsplit) factors go in and come out, so an adapter trained on N ranks runs on any
number of ranks. Adapter files (the project's and PEFT's) are read and written by
llama/formats/adapters.py and llama/formats/peft.py; training them is llama/tuning/.
"""

import math
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.errors import UserError
from llama.model import Transformer
from llama.parallel import LoRA, ParallelLinear

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
    a_dim, b_dim = layer.lora_split
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
    for name, lora in adapters(model).items():
        split = (None, 0) if lora.replicated == "A" else (1, None)
        for factor, tensor, dim in zip("AB", (lora.A, lora.B), split):
            tensor = tensor.detach()
            if dim is not None and tp > 1:
                pieces = [torch.empty_like(tensor) for _ in range(tp)]
                dist.all_gather(pieces, tensor.contiguous(), group=group)
                tensor = torch.cat(pieces, dim)
            full[f"{name}.lora.{factor}"] = tensor.cpu().clone()
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
