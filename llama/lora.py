"""LoRA adapters inside the tensor-parallel linears: the adapter module, its split, attach and gather.

LoRA (Hu et al. 2021) adds scale * B A x with A [r, in], B [out, r]. Inside a parallel linear it
is split like the layer, as HF PEFT's Megatron layers and LLaMA2-Accessory do, so it needs no
collective of its own in the forward (`factor_split_dims` derives it from the layer's own
`split_dim`, llama/parallel.py):
- column-parallel (split_dim 0): A [r, in] replicated, B [out/tp, r] split on dim 0 (like W);
- row-parallel (split_dim 1): A [r, in/tp] split on dim 1 (like W), B [out, r] replicated, and the
  partial product B A_local x_local joins the base's partial output *before* the one all-reduce.
The replicated factor gets only a partial gradient on each rank (its rank's share of the
outputs, or of the inputs); in training it passes through `parallel.copy_in` (identity forward,
all-reduce backward), so every rank ends up with the same, full gradient.

Tensors are named after the layer, `layers.N.attention.wq.lora.A` / `.lora.B`. Full (unsplit)
factors go in and come out, so an adapter trained on N ranks runs on any number of ranks. Adapter
files (the project's and PEFT's) are llama/formats/adapters.py and llama/formats/peft.py; training
them is llama/tuning/.
"""

import math
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.errors import UserError
from llama.model import ModelArgs, Transformer
from llama.parallel import ColumnParallelLinear, ParallelLinear, RowParallelLinear, copy_in, group_rank


def linear_targets() -> dict[str, Optional[str]]:
    """--lora_targets name -> the layer's module path in a block (None: the model's own `output`),
    read from the model: every parallel linear, in model order."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=8, multiple_of=1))
    paths = [name for name, module in model.named_modules() if isinstance(module, (ColumnParallelLinear, RowParallelLinear))]
    return {path.rsplit(".", 1)[-1]: path.split(".", 2)[2] if path.startswith("layers.") else None for path in paths}


TARGETS = linear_targets()  # {"wq": "attention.wq", ..., "w3": "feed_forward.w3", "output": None}
DEFAULT_TARGETS = tuple(name for name, path in TARGETS.items() if path is not None)  # the seven block linears


def factor_split_dims(weight_split_dim: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """(A's, B's) split dim for the adapter of a weight split on `weight_split_dim` (see the module doc);
    a replicated weight's adapter is replicated too."""
    return (1 if weight_split_dim == 1 else None), (0 if weight_split_dim == 0 else None)


class LoRA(nn.Module):
    """This rank's factors of a low-rank update: float32 A [r, in_local], B [out_local, r]."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, *, alpha: float, dropout: float = 0.0, replicated: str = "A", tp: int = 1):
        super().__init__()
        if replicated not in ("A", "B"):
            raise ValueError(f"replicated must be 'A' or 'B', got {replicated!r}")
        self.A = nn.Parameter(A.detach().float().clone())
        self.B = nn.Parameter(B.detach().float().clone())
        self.r, self.alpha = A.size(0), alpha
        self.replicated = replicated
        """The factor every tensor-parallel rank holds whole: "A" in a column-parallel layer, "B" in a row-parallel one."""
        self.tp = tp
        """Ranks the layer is split over: the replicated factor's gradient is summed over them in training."""
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        """False: the layer runs as its base alone (DPO's reference model is the base without adapters)."""

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r."""
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.A, self.B
        if self.replicated == "A":  # in training, the replicated factor's partial gradients are summed over TP ranks
            A = copy_in(A, self.training and self.tp > 1)
        else:
            B = copy_in(B, self.training and self.tp > 1)
        h = F.linear(self.dropout(x).to(A.dtype), A)
        return (F.linear(h, B) * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """scale * B @ A [out_local, in_local]: what merging adds to this rank's weight slice."""
        return self.scale * (self.B @ self.A)


def target_layers(model: Transformer, targets: list[str]) -> Iterator[tuple[str, ParallelLinear]]:
    """(module name, layer) of every targeted parallel linear, in model order."""
    for i, block in enumerate(model.layers):
        for name in targets:
            if TARGETS[name] is not None:
                yield f"layers.{i}.{TARGETS[name]}", block.get_submodule(TARGETS[name])
    if "output" in targets:
        yield "output", model.output


def parse_targets(text: str | list[str]) -> list[str]:
    """'wq,wv' or a list -> checked target names, in the table's order."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise UserError(f"unknown LoRA target {unknown or names}: choose from {', '.join(TARGETS)} (comma-separated)")
    return [t for t in TARGETS if t in names]


def local_slice(tensor: torch.Tensor, dim: Optional[int], tp_rank: int, tp: int) -> torch.Tensor:
    """Rank `tp_rank`'s equal slice of a full tensor along dim (the whole tensor if dim is None)."""
    return tensor if dim is None else tensor.chunk(tp, dim)[tp_rank]


def add_lora(model: Transformer, targets: list[str], *, r: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> None:
    """Give every targeted layer an adapter: B = 0 (the model is unchanged), A as PEFT draws it.

    PEFT initialises A with kaiming_uniform_(a=sqrt(5)) on the full [r, in] matrix. Every rank
    draws the full A from one CPU generator seeded alike and keeps its slice, so any TP layout
    starts from the same adapter. The base weights are frozen.
    """
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, layer in target_layers(model, targets):
        A = torch.empty(r, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        put_adapter(name, layer, A, torch.zeros(layer.out_features, r), alpha=alpha, dropout=dropout, device=model.norm.weight.device)


def put_adapter(name: str, layer: ParallelLinear, A: torch.Tensor, B: torch.Tensor, *, alpha: float, dropout: float = 0.0,
                device: torch.device) -> None:
    """Put the adapter with full factors A [r, in], B [out, r] into `layer`, keeping this rank's slices on
    `device` (the model's: a layer fused for inference holds no weight of its own)."""
    tp_rank, tp = group_rank(), layer.tp
    r = A.size(0)
    if A.shape != (r, layer.in_features) or B.shape != (layer.out_features, r):
        raise UserError(f"LoRA for '{name}' has A {tuple(A.shape)} and B {tuple(B.shape)}, but the layer is "
                        f"[{layer.out_features}, {layer.in_features}]: the adapter is for another model")
    a_dim, b_dim = factor_split_dims(layer.split_dim)
    split_width = layer.out_features // tp if b_dim is not None else layer.in_features // tp
    if r > split_width:
        raise UserError(f"--lora_rank {r} exceeds the {split_width} features '{name}' holds on each of {tp} "
                        f"tensor-parallel ranks: use a rank of at most {split_width}")
    layer.lora = LoRA(local_slice(A, a_dim, tp_rank, tp).to(device), local_slice(B, b_dim, tp_rank, tp).to(device), alpha=alpha, dropout=dropout,
                      replicated="A" if a_dim is None else "B", tp=tp)


def adapters(model: Transformer) -> dict[str, LoRA]:
    """Module name -> adapter, for every layer that has one."""
    return {name.removesuffix(".lora"): module for name, module in model.named_modules() if isinstance(module, LoRA)}


def set_enabled(model: Transformer, enabled: bool) -> None:
    """Switch every adapter on or off (off: the model is its base, bit for bit)."""
    for lora in adapters(model).values():
        lora.enabled = enabled


def local_state(model: Transformer) -> dict[str, torch.Tensor]:
    """This rank's adapter parameters by tensor name, `NAME.lora.A` and `NAME.lora.B`."""
    state = {}
    for name, lora in adapters(model).items():
        state[f"{name}.lora.A"], state[f"{name}.lora.B"] = lora.A, lora.B
    return state


def gather_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank: split ones all-gathered over the tensor-parallel group."""
    full = {}
    for name, lora in adapters(model).items():
        tp, group = model.get_submodule(name).tp, fs_init.get_model_parallel_group() if fs_init.model_parallel_is_initialized() else None
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
    for name in sorted({key.rsplit(".lora.", 1)[0] for key in full}):
        layer = modules.get(name)
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            raise UserError(f"adapter has weights for '{name}', which is not a linear layer of this model: the adapter is for another model")
        if f"{name}.lora.A" not in full or f"{name}.lora.B" not in full:
            raise UserError(f"adapter has only one of {name}.lora.A / {name}.lora.B")
        put_adapter(name, layer, full[f"{name}.lora.A"].float(), full[f"{name}.lora.B"].float(), alpha=alpha, dropout=dropout,
                    device=model.norm.weight.device)


def targets_of(full: Mapping[str, torch.Tensor]) -> list[str]:
    """The --lora_targets names an adapter's tensors cover."""
    paths = {key.rsplit(".lora.", 1)[0].split(".", 2)[-1] if key.startswith("layers.") else "output" for key in full}
    return [t for t, path in TARGETS.items() if (path or "output") in paths]
