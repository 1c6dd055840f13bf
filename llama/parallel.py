"""Tensor-parallel layers: the one place a layer's split over the ranks is declared, and the one
place a linear picks its local kernel.

Each layer class states which dim of its weight is cut over the `tp` ranks (`split_dim`), and
everything else that depends on the split reads it from there: the checkpoint layout
(llama/formats/layout.py), the LoRA factors (llama/lora.py), the quantized targets, the planner.
Meta's `model.py` builds the same layers with fairscale; these are written out here (~150 lines)
so that a reader sees all of tensor parallelism in one file, and so that a model can be built on
the meta device and then receive only this rank's slices (fairscale's layers first build and
initialise each whole matrix on every rank).

- `ColumnParallelLinear` (wq, wk, wv, w1, w3, output) keeps out/tp rows of W [out, in]
  (split_dim 0) and returns its slice of the outputs; `gather_output` all-gathers them.
- `RowParallelLinear` (wo, w2) keeps in/tp columns (split_dim 1), reads its slice of the inputs
  and all-reduces the partial outputs: the one collective of the pair.
- `ParallelEmbedding` (Llama 1/2) keeps dim/tp columns of the table and all-gathers them;
  `VocabParallelEmbedding` (Meta's Llama 3 code) keeps vocab/tp rows and all-reduces the one
  non-zero row per token.

The collectives come from fairscale's `mappings` (autograd functions whose backward is the
matching collective: copy <-> all-reduce, all-reduce <-> copy, gather <-> split) when the layer is
in training mode (`module.train()`); in eval mode the all-reduces are plain `torch.distributed`
calls and the input copy is skipped (no autograd graph: fairscale's all-reduce marks its output
dirty, which torch.compile cannot trace). The all-gather is fairscale's in both modes (it traces).
The mode is the module's own flag, set explicitly by whoever trains (llama/tuning/methods.py),
never inferred from grad mode.

A linear's local product is `local(x)`: the dense slice, or a quantized kernel
(llama/kernels/linear.py) holding this rank's slice with its own scales, plus a LoRA adapter
(llama/lora.py) if the layer holds one; a row-parallel layer's partial output, adapter included,
is complete before its one all-reduce.

For inference, column-parallel layers that read the same input (wq|wk|wv, w1|w3) can run as one
product, `FusedColumnParallelLinear`: fewer, larger calls per token.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn


def group_size() -> int:
    """Ranks in this process's tensor-parallel group (1 when none is set up)."""
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def group_rank() -> int:
    return fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else 0


def local_size(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} {size} does not split over {tp} tensor-parallel ranks")
    return size // tp


def all_reduce(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Sum over the tensor-parallel group; its gradient is the incoming one (fairscale's reduce)."""
    if differentiable:
        return reduce_from_model_parallel_region(x)
    dist.all_reduce(x, group=fs_init.get_model_parallel_group())
    return x


def copy_in(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """The input of a column-split layer: identity forward; in training the backward all-reduces
    the input's gradient (each rank holds only its outputs' share of it)."""
    return copy_to_model_parallel_region(x) if differentiable else x


def gather_last(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dim over the group (the backward keeps this rank's part)."""
    return gather_from_model_parallel_region(x)


class ColumnParallelLinear(nn.Module):
    """Output features split over the tp ranks: W_local [out/tp, in]."""

    split_dim = 0
    """The dim of W [out, in] cut over the ranks: its rows."""

    weight: Optional[nn.Parameter]
    """This rank's rows of W, or None when a `kernel` holds them."""
    kernel: Optional[nn.Module]
    """A kernel multiplying by this rank's rows in another form (quantized, or packed for a CPU GEMM library); None: F.linear."""
    lora: Optional[nn.Module]
    """A LoRA adapter (llama/lora.py) added to the local product, or None."""

    def __init__(self, in_features: int, out_features: int, tp: int = 1, gather_output: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.tp, self.gather_output = in_features, out_features, tp, gather_output
        self.weight = nn.Parameter(torch.empty(local_size(out_features, tp, "out_features"), in_features))
        self.kernel = None
        self.lora = None

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product: dense or through its kernel, + LoRA if any."""
        return plus_lora(self, x, F.linear(x, self.weight) if self.kernel is None else self.kernel(x))

    def split_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the outputs, never gathered (the vocabulary-parallel loss reads the
        output head this way: llama/tuning/loss.py)."""
        return self.local(copy_in(x, self.training and self.tp > 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.split_forward(x)
        return gather_last(out) if self.gather_output and self.tp > 1 else out


class RowParallelLinear(nn.Module):
    """Input features split over the tp ranks: W_local [out, in/tp]; the partial outputs are all-reduced."""

    split_dim = 1
    """The dim of W [out, in] cut over the ranks: its columns."""

    weight: Optional[nn.Parameter]
    kernel: Optional[nn.Module]
    lora: Optional[nn.Module]

    def __init__(self, in_features: int, out_features: int, tp: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.tp = in_features, out_features, tp
        self.weight = nn.Parameter(torch.empty(out_features, local_size(in_features, tp, "in_features")))
        self.kernel = None
        self.lora = None

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial output (its columns' share), + LoRA, before the all-reduce."""
        return plus_lora(self, x, F.linear(x, self.weight) if self.kernel is None else self.kernel(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local(x)
        return all_reduce(out, self.training) if self.tp > 1 else out


ParallelLinear = ColumnParallelLinear | RowParallelLinear


def plus_lora(layer: ParallelLinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out`, a layer's local product of x, with the layer's LoRA adapter added when it has one switched on."""
    return out if layer.lora is None or not layer.lora.enabled else out + layer.lora(x)


class FusedColumnParallelLinear(nn.Module):
    """Column-parallel layers that read the same input (wq|wk|wv, w1|w3) run as one product: inference only.

    Each rank stacks its own rows of the parts, [W1_local; W2_local; ...], so one product gives this
    rank's outputs of every part side by side, and they split back exactly (`sizes`: the parts' local
    rows). Per-row int8 and per-group int4 scales belong to rows, so quantizing the stack gives each
    part's own codes and scales. The loader builds it (llama.formats.load, `inference=True`): dense parts
    become views of the stacked weight (no memory added, the state dict unchanged); quantized parts
    give their rows to the one `kernel` and hold neither weight nor kernel themselves. A part's LoRA
    adapter, put on the part at any time, is added to the part's share of the output. Training never
    fuses (the parts' collectives and gradients are theirs): this module refuses to run in training mode.
    """

    def __init__(self, sizes: list[int], weight: Optional[torch.Tensor] = None, kernel: Optional[nn.Module] = None):
        super().__init__()
        self.sizes = sizes
        self.register_buffer("weight", weight, persistent=False)  # the parts' weights are views of it
        self.kernel = kernel

    def forward(self, x: torch.Tensor, parts: tuple[ColumnParallelLinear, ...]) -> list[torch.Tensor]:
        """Each part's local output, adapters included; `parts` are the layers fused, in order."""
        if self.training:
            raise RuntimeError("fused projections are for inference: load the model without inference=True to train it")
        out = F.linear(x, self.weight) if self.kernel is None else self.kernel(x)
        outs = out.split(self.sizes, dim=-1)
        return [plus_lora(p, x, o) for o, p in zip(outs, parts)]


class ParallelEmbedding(nn.Module):
    """Llama 1/2: the table [vocab, dim] split on its columns; each rank looks up its dim/tp
    features of every token and the slices are all-gathered."""

    split_dim = 1

    def __init__(self, vocab_size: int, dim: int, tp: int = 1):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(vocab_size, local_size(dim, tp, "dim")))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        return gather_last(out) if self.tp > 1 else out


class VocabParallelEmbedding(nn.Module):
    """Meta's Llama 3 layout: the table split on the vocabulary. Rank r holds rows
    [r V/tp, (r+1) V/tp), looks up the ids in its range, zeroes the others, and the all-reduce sums
    the one non-zero row per token."""

    split_dim = 0

    def __init__(self, vocab_size: int, dim: int, tp: int = 1):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(local_size(vocab_size, tp, "vocab_size"), dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        start = group_rank() * self.weight.size(0)
        outside = (ids < start) | (ids >= start + self.weight.size(0))
        out = F.embedding((ids - start).masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.training)


PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, VocabParallelEmbedding)


def split_dims(model: nn.Module) -> dict[str, Optional[int]]:
    """Every parameter's name -> the dim it is cut on over the ranks, read from the layer that
    holds it (None: every rank holds it whole, e.g. the norms)."""
    dims = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            split = module.split_dim if isinstance(module, PARALLEL_LAYERS) and param_name == "weight" else None
            dims[f"{module_name}.{param_name}" if module_name else param_name] = split
    return dims
