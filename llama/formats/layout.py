"""How a Llama's weights are named, shaped and split over tensor-parallel ranks, read from the model.

Nothing here restates the model: which dim each weight is split on comes from the parallel layer
that holds it (`split_dim` on the classes in llama/parallel.py), and names and shapes from the
model built on the meta device (no memory). The loader, the resharder, the converters, the adapter
merge, the planner and the tests read these tables. Files of every format name weights as Meta
does (`layers.N.attention.wq.weight`); readers of other formats translate their names into these.
"""

import functools
import re
from typing import Mapping, Optional, Sequence

import torch

from llama.errors import UserError
from llama.lora import factor_split_dims
from llama.model import ModelArgs, Transformer
from llama.parallel import split_dims


def meta_model(args: ModelArgs) -> Transformer:
    """The model's structure on one rank without memory: what names and shapes are read from."""
    with torch.device("meta"):
        return Transformer(args)


@functools.cache
def split_table(vocab_parallel: bool = False) -> dict[str, Optional[int]]:
    """Weight name (without the "layers.N." prefix) -> the dim split across tensor-parallel ranks,
    or None when every rank holds a full copy: column-parallel layers split their outputs (dim 0),
    row-parallel layers their inputs (dim 1). The embedding has two layouts: Llama 1/2's
    ParallelEmbedding splits the embedding dim, Meta's Llama 3 code the vocabulary (`vocab_parallel`)."""
    tiny = ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=8, multiple_of=1, vocab_parallel_embedding=vocab_parallel)
    table = {_LAYER_PREFIX.sub("", name): dim for name, dim in split_dims(meta_model(tiny)).items()}
    return {**table, **{key: None for key in NOT_LOADED}}


# Keys Meta's files carry that the model recomputes instead of loading.
NOT_LOADED = {"rope.freqs"}


EMBEDDING = "tok_embeddings.weight"


OUTPUT = "output.weight"


# A vocabulary this large is Llama 3's (128256); such Meta files split the embedding on the vocab.
LLAMA3_MIN_VOCAB = 128000


_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")


_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


def shard_name(rank: int) -> str:
    """Meta's file name of tensor-parallel shard `rank`."""
    return f"consolidated.{rank:02d}.pth"


def split_dim(key: str, vocab_parallel: bool = False) -> Optional[int]:
    """The dim `key` is split on across ranks, None if replicated; unknown keys are an error.

    `vocab_parallel`: the checkpoint's embedding is split on the vocabulary (Llama 3 layout).
    """
    table = split_table(vocab_parallel)
    name = _LAYER_PREFIX.sub("", key)
    if name not in table:
        raise UserError(f"unknown weight '{key}' in checkpoint: not a Llama weight this project knows how to shard")
    return table[name]


def lora_split_dims(weight_key: str) -> tuple[Optional[int], Optional[int]]:
    """(A's, B's) split dim for the adapter of `weight_key`, from the base weight's split dim."""
    return factor_split_dims(split_dim(weight_key))


def tensor_split_dim(key: str) -> Optional[int]:
    """Split dim of an adapter tensor `...wq.lora.A` (or of a base weight, for full fine-tuning)."""
    if ".lora." not in key:
        return split_dim(key)
    module, factor = key.rsplit(".lora.", 1)
    a_dim, b_dim = lora_split_dims(module + ".weight")
    return a_dim if factor == "A" else b_dim


def split_sizes(args: ModelArgs) -> dict[str, int]:
    """The sizes that must divide by the number of shards, by name."""
    return {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "hidden_dim": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "dim": args.dim,
    }


def check_shardable(args: ModelArgs, n: int, unit: str = "shards") -> None:
    """Error naming every size that `n` does not divide, and the shard counts that would work."""
    sizes = split_sizes(args)
    bad = [f"{name}={size}" for name, size in sizes.items() if size % n]
    if bad:
        ok = [k for k in range(1, max(sizes.values()) + 1) if all(s % k == 0 for s in sizes.values())]
        raise UserError(f"{n} {unit.removesuffix('s') if n == 1 else unit} {'does' if n == 1 else 'do'} not divide {', '.join(bad)}; "
                        f"numbers of {unit} that work: {ok}")


def full_shape(key: str, pieces: Sequence[torch.Tensor], vocab_parallel: bool = False) -> torch.Size:
    """Shape of the unsharded tensor, checking that the pieces agree."""
    dim = split_dim(key, vocab_parallel)
    first = pieces[0].shape
    for piece in pieces[1:]:
        if piece.shape != first:
            raise UserError(f"'{key}' has shape {tuple(piece.shape)} in one shard and {tuple(first)} in another")
    if dim is None:
        return first
    shape = list(first)
    shape[dim] *= len(pieces)
    return torch.Size(shape)


def slice_pieces(pieces: Sequence[torch.Tensor], *, stored_dim: Optional[int], dim: Optional[int], rank: int, n_ranks: int,
                 key: str = "weight") -> torch.Tensor:
    """Rank `rank`'s slice (of n_ranks) along `dim` of a tensor stored as equal `pieces` along `stored_dim`.

    Only the overlapping parts of the (memory-mapped) pieces are touched. Replicated weights
    (dim None) come from the first piece. Pieces stored along another dim than the one wanted
    (a tied output layer read from an embedding split on its other dim) are joined first.
    """
    if dim is None:
        return pieces[0]
    if stored_dim != dim and len(pieces) > 1:
        pieces, stored_dim = [torch.cat(list(pieces), dim=stored_dim)], dim
    piece_len = pieces[0].shape[dim]
    total = piece_len * len(pieces)
    if total % n_ranks:
        raise UserError(f"'{key}' has size {total} on dim {dim}, which does not split into {n_ranks} parts")
    start, stop = rank * total // n_ranks, (rank + 1) * total // n_ranks
    parts = []
    for i, piece in enumerate(pieces):
        lo, hi = max(start, i * piece_len), min(stop, (i + 1) * piece_len)
        if lo < hi:
            parts.append(piece.narrow(dim, lo - i * piece_len, hi - lo))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def rank_slice(key: str, pieces: Sequence[torch.Tensor], *, rank: int, n_ranks: int, vocab_parallel: bool = False) -> torch.Tensor:
    """Rank `rank`'s slice of `key` stored as `pieces` split along its own split dim."""
    dim = split_dim(key, vocab_parallel)
    return slice_pieces(pieces, stored_dim=dim, dim=dim, rank=rank, n_ranks=n_ranks, key=key)


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every weight the model loads, as Meta's files store them, in the
    model's own order (that of `Transformer.state_dict()` and of Meta's files)."""
    return {name: tuple(param.shape) for name, param in meta_model(args).named_parameters()}


def check_names(names: set[str], args: ModelArgs, source: str, describe: str = "params.json") -> None:
    """Every weight `describe` implies is present (the output may be tied), nothing unexpected is."""
    expected = full_shapes(args)
    missing = sorted(set(expected) - names - {OUTPUT})
    if missing:
        raise UserError(f"{source} lacks weights {missing[:3]}{' ...' if len(missing) > 3 else ''}: wrong {describe} or a truncated file?")
    extra = sorted(names - set(expected) - NOT_LOADED)
    if extra:
        split_dim(extra[0])  # an unknown name gets its own message
        raise UserError(f"{source} has weights {describe} does not describe, e.g. {extra[:3]}: wrong {describe}?")


def rope_freqs(args: ModelArgs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Meta's stored `rope.freqs` (the unscaled inverse frequencies); the model recomputes it."""
    exponents = torch.arange(0, args.head_dim, 2).float() / args.head_dim
    return (1.0 / args.rope_theta**exponents).to(dtype)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full (1-shard) Meta-layout state dict with random weights, for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in full_shapes(args).items():
        if key.endswith("norm.weight"):
            state[key] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)
    state["rope.freqs"] = rope_freqs(args, dtype)
    return state


def shard_state_dict(state: Mapping[str, torch.Tensor], rank: int, n_ranks: int, vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """Rank `rank` of an n_ranks-way split of a full state dict (copies, ready to save)."""
    return {k: rank_slice(k, [v], rank=rank, n_ranks=n_ranks, vocab_parallel=vocab_parallel).clone() for k, v in state.items()}
