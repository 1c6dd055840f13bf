"""Tensor-parallel linear layers: where a layer's split and its local kernel are decided.

A column-parallel layer (wq, wk, wv, w1, w3, output) keeps out/tp rows of W [out, in] and
returns its slice of the outputs; a row-parallel layer (wo, w2) keeps in/tp columns, reads its
slice of the inputs and all-reduces the partial outputs. Both are fairscale's layers (same
weights, same checkpoint keys) with one forward written here, so the local kernel is one
method, `local`: the dense product with this rank's slice, plus, when the layer holds one, a
LoRA adapter; a quantized layer (llama/quantize.py) holds no float weight but a kernel, `quant`,
that multiplies by this rank's quantized slice with its own scales, so a row-parallel layer's
partial output is already scaled when it is all-reduced. llama.formats.layout.SPLIT_DIMS says how
a checkpoint's weights split.

LoRA (Hu et al. 2021) adds scale * B A x with A [r, in], B [out, r]. Inside a parallel layer it
is split like the layer, as HF PEFT's Megatron layers and LLaMA2-Accessory do, so it needs no
collective of its own in the forward:
- column-parallel: A [r, in] replicated, B [out/tp, r] split on dim 0 (like W);
- row-parallel: A [r, in/tp] split on dim 1 (like W), B [out, r] replicated, and the partial
  product B A_local x_local joins the base's partial output *before* the one all-reduce.
The replicated factor gets only a partial gradient on each rank (its rank's share of the
outputs, or of the inputs); it passes through fairscale's copy_to_model_parallel_region
(identity forward, all-reduce backward), so every rank ends up with the same, full gradient.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn


class LoRA(nn.Module):
    """This rank's factors of a low-rank update: float32 A [r, in_local], B [out_local, r].

    `replicated` names the factor every tensor-parallel rank holds whole ("A" under a
    column-parallel layer, "B" under a row-parallel one).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0, replicated: str = "A"):
        super().__init__()
        if replicated not in ("A", "B"):
            raise ValueError(f"replicated must be 'A' or 'B', got {replicated!r}")
        self.A = nn.Parameter(A.detach().float().clone())
        self.B = nn.Parameter(B.detach().float().clone())
        self.rank, self.alpha, self.replicated = A.size(0), alpha, replicated
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r."""
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.A, self.B
        if torch.is_grad_enabled():  # sum the replicated factor's partial gradients over TP ranks
            if self.replicated == "A":
                A = copy_to_model_parallel_region(A)
            else:
                B = copy_to_model_parallel_region(B)
        h = F.linear(self.dropout(x).to(A.dtype), A)
        return (F.linear(h, B) * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """scale * B @ A [out_local, in_local]: what merging adds to this rank's weight slice."""
        return self.scale * (self.B @ self.A)


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """Output features split over TP ranks; `gather_output` all-gathers them (the vocabulary head).

    Under autograd the input passes through fairscale's copy (all-reduce of its gradient);
    generation needs no gradient, so it skips that per-call cost.
    """

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True):
        super().__init__(in_features, out_features, bias=False, gather_output=gather_output, init_method=_no_init)
        self.lora: Optional[LoRA] = None
        self.quant: Optional[nn.Module] = None

    lora_split = (None, 0)
    """(A's, B's) split dim over TP ranks: A [r, in] replicated, B [out, r] split like the weight's rows."""

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's kernel: dense or quantized, + LoRA if any."""
        out = F.linear(x, self.weight) if self.quant is None else self.quant(x)
        return out if self.lora is None else out + self.lora(x)

    def split_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the outputs, never gathered: the vocabulary-parallel loss
        (llama/tuning/loss.py) reads the vocabulary head's logits this way."""
        if torch.is_grad_enabled():
            x = copy_to_model_parallel_region(x)
        return self.local(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.split_forward(x)
        return gather_from_model_parallel_region(out) if self.gather_output else out


class RowParallelLinear(fs_layers.RowParallelLinear):
    """Input features split over TP ranks; the partial outputs are all-reduced (one collective).

    fairscale all-reduces inside an autograd.Function that calls ctx.mark_dirty, which dynamo
    cannot trace; without autograd this layer all-reduces directly, so torch.compile can.
    """

    def __init__(self, in_features: int, out_features: int, input_is_parallel: bool = True):
        if not input_is_parallel:
            raise ValueError("Llama's row-parallel layers read the column-parallel layers' split outputs")
        super().__init__(in_features, out_features, bias=False, input_is_parallel=True, init_method=_no_init)
        self.lora: Optional[LoRA] = None
        self.quant: Optional[nn.Module] = None

    lora_split = (1, None)
    """(A's, B's) split dim over TP ranks: A [r, in] split like the weight's columns, B [out, r] replicated."""

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial output: dense or quantized (scaled by this rank's scales), + LoRA, before the all-reduce."""
        out = F.linear(x, self.weight) if self.quant is None else self.quant(x)
        return out if self.lora is None else out + self.lora(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local(x)
        if torch.is_grad_enabled():
            return reduce_from_model_parallel_region(out)
        if fs_init.get_model_parallel_world_size() > 1:
            dist.all_reduce(out, group=fs_init.get_model_parallel_group())
        return out


ParallelLinear = ColumnParallelLinear | RowParallelLinear


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    """Weights come from a checkpoint, so fairscale's random init would be wasted work."""
    return weight
