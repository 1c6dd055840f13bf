"""Loading this rank's slice of any checkpoint into the tensor-parallel model.

The model is built on the meta device (its structure, no memory), then each weight it holds is
replaced by this rank's slice read from the checkpoint (`load_state_dict(assign=True)`): a rank never
allocates, initialises or reads the other ranks' parts. With `spec.quantize`, each block linear's
slice is quantized as soon as it is read, so a rank holds its quantized slices plus one
unquantized tensor at a time; the layer then keeps the quantized kernel and no float weight.

For inference (`inference=True`), the layers a module declares fusable (`FUSED`: wq|wk|wv, w1|w3) are
read as a group and stacked, each rank its own rows, into one `FusedColumnParallelLinear`: quantized
as one stack, or dense with the parts' weights as views of it; and on a CPU, the dense float32 linears
may be packed for a GEMM library (`spec.prepack`, llama.kernels.packed.PackedLinear), which then holds
them instead of the layer. Every linear's kernel is picked by `llama.kernels.linear.linear_kernel`.
"""

from typing import Optional

import torch
from tqdm import tqdm

from llama.config import LoadSpec, resolve_dtype
from llama.formats import open_checkpoint
from llama.formats.layout import check_shardable
from llama.kernels.linear import linear_kernel
from llama.kernels.schemes import Scheme, head_scheme
from llama.model import Transformer
from llama.parallel import ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear


def load_model(spec: LoadSpec, *, vocab_size: Optional[int], device: torch.device, tp_rank: int = 0, tp_size: int = 1,
               inference: bool = False) -> Transformer:
    """Load this rank's slice of a checkpoint (any format, any shard count) into a model split over tp_size ranks.

    `vocab_size` is the tokenizer's (a params.json that says -1 takes it). The KV caches get
    `spec.max_batch_size` rows (0: none, as training needs; the RoPE table is always made).
    `inference`: stack wq|wk|wv and w1|w3 into one product each and pack the dense linears by `spec.prepack`
    (forward only: no float weights to train; see the module doc).
    """
    dtype = resolve_dtype(spec.dtype, torch.device(device))
    overrides = {"rope_scaling": {"factor": spec.rope_scaling_factor}} if spec.rope_scaling_factor is not None else {}
    ckpt = open_checkpoint(spec.ckpt_dir, vocab_size, verify=spec.verify, max_seq_len=spec.max_seq_len, max_batch_size=spec.max_batch_size,
                           **overrides)
    check_shardable(ckpt.args, tp_size, unit="tensor-parallel ranks")
    with torch.device("meta"):
        model = Transformer(ckpt.args, tp_size)
    targets = quantize_targets(model, spec.quantize)
    groups = fusion_groups(model) if inference else {}
    linears = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (ColumnParallelLinear, RowParallelLinear))}
    packing = spec.prepack if inference else "none"
    weights, pending = {}, {}
    keys = ckpt.keys
    quiet = tp_rank != 0 or (len(keys) < 50 and spec.quantize is None)  # quantizing takes seconds even for small models
    desc = f"loading {ckpt.path.name}" + (f", quantizing to {spec.quantize}" if spec.quantize else "")
    for key in tqdm(keys, desc=desc, disable=quiet, leave=False):
        stored = ckpt.read(key, tp_rank, tp_size)
        if key in groups:
            pending[key] = stored
            fused, keys = groups[key]
            if all(k in pending for k in keys):
                fuse_group(model, fused, keys, [pending.pop(k) for k in keys], scheme=targets.get(key), packing=packing, weights=weights,
                           device=device, dtype=dtype)
        elif key in linears and (kernel := linear_kernel(key.removesuffix(".weight"), stored, targets.get(key), device, dtype,
                                                         packing=packing)) is not None:
            layer = model.get_submodule(key.removesuffix(".weight"))
            layer.weight, layer.kernel = None, kernel
        else:
            tensor = stored.to(device=device, dtype=dtype).contiguous()
            # quantizing, the float weights left are copied out of the mapped file, so that its mapping (and the
            # resident pages of the linears read to be quantized) closes when loading ends
            weights[key] = tensor.clone() if targets and tensor.data_ptr() == stored.data_ptr() else tensor
    model.load_state_dict(weights, strict=True, assign=True)
    model.quantization = None if spec.quantize is None else str(spec.quantize)
    model.requires_grad_(False)
    model.setup_caches(spec.max_batch_size, spec.max_seq_len)
    return model.eval()


def fusion_groups(model: Transformer) -> dict[str, tuple[str, list[str]]]:
    """Weight name -> (the fused module's name, the weight names of its group), for every group a
    module declares (`FUSED`, e.g. Attention's wqkv = wq|wk|wv)."""
    groups = {}
    for name, module in model.named_modules():
        for fused, parts in getattr(type(module), "FUSED", {}).items():
            keys = [f"{name}.{part}.weight" for part in parts]
            groups.update({key: (f"{name}.{fused}", keys) for key in keys})
    return groups


def fuse_group(model: Transformer, fused: str, keys: list[str], slices: list[torch.Tensor], *, scheme: Optional[Scheme], packing: str,
               weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """This rank's slices of one group stacked into the FusedColumnParallelLinear `fused`: one kernel for the
    stack (quantized by `scheme` or packed by `packing`), or dense, the parts' weights (into `weights`) then
    views of the stack."""
    stacked = torch.cat([s.to(device=device, dtype=dtype) for s in slices])
    sizes = [s.size(0) for s in slices]
    kernel = linear_kernel(fused, stacked, scheme, device, dtype, packing=packing)
    if kernel is None:
        weights.update(zip(keys, stacked.split(sizes)))
        module = FusedColumnParallelLinear(sizes, weight=stacked)
    else:
        for key in keys:
            model.get_submodule(key.removesuffix(".weight")).weight = None
        module = FusedColumnParallelLinear(sizes, kernel=kernel)
    parent, name = fused.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, module)


def quantize_targets(model: Transformer, scheme: Optional[Scheme]) -> dict[str, Scheme]:
    """Weight name -> its scheme under --quantize `scheme`: every parallel linear inside the blocks
    takes `scheme`, the output head `schemes.head_scheme(scheme)` (int8 under int8 and int4, none
    under nf4); the embeddings and norms keep the model dtype."""
    if scheme is None:
        return {}
    targets = {f"layers.{name}.weight": scheme for name, module in model.layers.named_modules()
               if isinstance(module, (ColumnParallelLinear, RowParallelLinear))}
    head = head_scheme(scheme)
    return targets if head is None else {**targets, "output.weight": head}
