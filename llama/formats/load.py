"""Loading this rank's slice of any checkpoint into the tensor-parallel model."""

from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama import quantize as quant
from llama.formats import open_checkpoint
from llama.formats.layout import check_shardable
from llama.model import ModelArgs, Transformer


def load_model(
    ckpt_dir: Path,
    vocab_size: Optional[int],
    max_seq_len: int,
    max_batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    kv_cache: bool = True,
    quantize: Optional[str] = None,
    **overrides,
) -> Transformer:
    """Load this rank's slice of a checkpoint (any format, any shard count) into a model split over tp_size ranks.

    The KV caches are allocated for generation; training passes kv_cache=False (RoPE table only).
    `quantize` (a --quantize value, llama/quantize.py) quantizes each linear's slice as soon as it
    is read, so a rank holds its quantized slices plus one unquantized tensor at a time.
    `overrides` replace ModelArgs fields (e.g. rope_scaling).
    """
    scheme = quant.parse_scheme(quantize)
    ckpt = open_checkpoint(ckpt_dir, vocab_size, max_seq_len=max_seq_len, max_batch_size=max_batch_size, **overrides)
    check_shardable(ckpt.args, tp_size, unit="tensor-parallel ranks")
    model = build_empty(ckpt.args, dtype)
    weights, quantized = {}, {}
    keys = ckpt.keys
    for key in tqdm(keys, desc=f"loading {ckpt.path.name}", disable=tp_rank != 0 or len(keys) < 50, leave=False):
        if quant.applies(scheme, key):
            quantized[key] = quant.quantize_weight(ckpt.read(key, tp_rank, tp_size), scheme, device, dtype)
        else:
            stored = ckpt.read(key, tp_rank, tp_size)
            weights[key] = quant.own(stored.to(device=device, dtype=dtype).contiguous(), stored, scheme)
    quant.attach(model, quantized, scheme)  # the quantized layers drop their float weights (never filled)
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False)
    model.setup_caches(max_batch_size, max_seq_len, kv_cache)
    return model.eval()


def build_empty(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    """The model with uninitialised CPU weights, to be replaced by `load_state_dict(assign=True)`.

    fairscale's layers allocate with the legacy `torch.Tensor(...)` constructor, which ignores
    `torch.device("meta")`; building in the target dtype at least halves that transient memory
    for 16-bit models. With several ranks, fairscale also builds each whole matrix and copies
    this rank's part into the weight, touching all its pages: a rank would hold its weights twice
    while loading (built + read). Every weight is replaced, so that step is skipped here and the
    pages are never touched.
    """
    from fairscale.nn.model_parallel import layers

    previous, initialize = torch.get_default_dtype(), layers._initialize_affine_weight
    torch.set_default_dtype(dtype)
    layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        return Transformer(args)
    finally:
        torch.set_default_dtype(previous)
        layers._initialize_affine_weight = initialize
