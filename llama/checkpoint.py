"""Meta checkpoint directories: params.json, consolidated.NN.pth shards, and how weights split.

`SPLIT_DIMS` is the one table of which dim each weight is split on under tensor parallelism.
The loader, the resharder and the tests all read it. With it, an M-shard checkpoint loads on
N ranks for any M and N that divide the split sizes: each rank narrows the memory-mapped
source tensors to exactly its slice, so nothing else is read into memory.
"""

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from llama.errors import UserError
from llama.model import ModelArgs, Transformer

# Weight name (without the "layers.N." prefix) -> dim split across tensor-parallel ranks, or
# None when every rank holds a full copy. Column-parallel layers split their outputs (dim 0),
# row-parallel layers their inputs (dim 1); fairscale's ParallelEmbedding splits the embedding dim.
SPLIT_DIMS: dict[str, Optional[int]] = {
    "tok_embeddings.weight": 1,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
    "rope.freqs": None,
}

# Keys Meta's files carry that the model recomputes instead of loading.
NOT_LOADED = {"rope.freqs"}

_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_dim(key: str) -> Optional[int]:
    """The dim `key` is split on across ranks, None if replicated; unknown keys are an error."""
    name = _LAYER_PREFIX.sub("", key)
    if name not in SPLIT_DIMS:
        raise UserError(f"unknown weight '{key}' in checkpoint: not a Llama weight this project knows how to shard")
    return SPLIT_DIMS[name]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_params(path: Path) -> dict:
    """params.json as a dict; missing or malformed files are a UserError."""
    if not path.is_file():
        raise UserError(f"{path} not found: a model directory needs params.json (Meta layout)")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a JSON object of model parameters")
    return params


def model_args(params: Mapping, vocab_size: Optional[int] = None, **overrides) -> ModelArgs:
    """ModelArgs from params.json; `vocab_size: -1` is filled from the tokenizer, a mismatch is an error."""
    known = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"params.json has unknown keys {unknown}; known keys are {sorted(known)}")
    args = ModelArgs(**{**params, **overrides})
    if vocab_size is not None:
        if args.vocab_size == -1:
            args.vocab_size = vocab_size
        elif args.vocab_size != vocab_size:
            raise UserError(
                f"tokenizer has {vocab_size} tokens but params.json says vocab_size {args.vocab_size}: "
                "use the tokenizer.model that came with this checkpoint"
            )
    if args.vocab_size <= 0:
        raise UserError("vocab_size is unknown: set it in params.json or pass the model's tokenizer")
    if args.dim % args.n_heads:
        raise UserError(f"dim {args.dim} is not divisible by n_heads {args.n_heads} in params.json")
    return args


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
        raise UserError(f"{n} {unit} do not divide {', '.join(bad)}; numbers of {unit} that work: {ok}")


def shard_paths(ckpt_dir: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.MM.pth, checked for gaps."""
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} not found")
    numbered = {}
    for path in ckpt_dir.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise UserError(f"no consolidated.NN.pth shards in {ckpt_dir}")
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        raise UserError(f"shard numbering in {ckpt_dir} has gaps: missing {['consolidated.%02d.pth' % i for i in missing]}")
    return [numbered[i] for i in sorted(numbered)]


def load_file(path: Path, mmap: bool = True):
    """torch.load with weights only (no pickled code runs); an unreadable file is a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for truncated, foreign or pickled-code files
        raise UserError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None


def open_shards(paths: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    """Memory-map every shard; nothing is read yet."""
    shards = []
    for path in paths:
        shards.append(load_file(path))
        if not isinstance(shards[-1], dict) or not all(isinstance(t, torch.Tensor) for t in shards[-1].values()):
            raise UserError(f"{path} is not a checkpoint shard: expected a dict of weight name -> tensor")
    keys = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:5]
            raise UserError(f"{path} has different weight names from {paths[0]} (e.g. {diff})")
    return shards


def full_shape(key: str, pieces: Sequence[torch.Tensor]) -> torch.Size:
    """Shape of the unsharded tensor, checking that the pieces agree."""
    dim = split_dim(key)
    first = pieces[0].shape
    for piece in pieces[1:]:
        if piece.shape != first:
            raise UserError(f"'{key}' has shape {tuple(piece.shape)} in one shard and {tuple(first)} in another")
    if dim is None:
        return first
    shape = list(first)
    shape[dim] *= len(pieces)
    return torch.Size(shape)


def rank_slice(key: str, pieces: Sequence[torch.Tensor], rank: int, n_ranks: int) -> torch.Tensor:
    """Rank `rank`'s slice (of n_ranks) of the tensor stored as equal `pieces` along its split dim.

    Only the overlapping parts of the (memory-mapped) pieces are touched. Replicated weights
    come from the first piece.
    """
    dim = split_dim(key)
    if dim is None:
        return pieces[0]
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


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every weight the model loads, as Meta's files store them."""
    dim, hidden, vocab = args.dim, args.hidden_dim, args.vocab_size
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(args.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (q_out, dim),
            f"layers.{i}.attention.wk.weight": (kv_out, dim),
            f"layers.{i}.attention.wv.weight": (kv_out, dim),
            f"layers.{i}.attention.wo.weight": (dim, q_out),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    return shapes


def check_against_args(shards: Sequence[Mapping[str, torch.Tensor]], args: ModelArgs) -> None:
    """Every weight params.json implies is present with its shape, and nothing unexpected is."""
    expected = full_shapes(args)
    names = set(shards[0])
    missing = sorted(set(expected) - names)
    if missing:
        raise UserError(f"checkpoint lacks weights {missing[:3]}{' ...' if len(missing) > 3 else ''}: wrong params.json or a truncated file?")
    extra = sorted(names - set(expected) - NOT_LOADED)
    if extra:
        split_dim(extra[0])  # an unknown name gets its own message
        raise UserError(f"checkpoint has weights params.json does not describe, e.g. {extra[:3]}: wrong params.json?")
    for key in sorted(names):
        shape = tuple(full_shape(key, [shard[key] for shard in shards]))
        if key in expected and shape != expected[key]:
            raise UserError(f"'{key}' is {shape} but params.json implies {expected[key]}")


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
) -> Transformer:
    """Load this rank's slice of an M-shard checkpoint into a model split over tp_size ranks.

    The KV caches are allocated for generation; training passes kv_cache=False (RoPE table only).
    """
    from tqdm import tqdm

    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir / "params.json")
    args = model_args(params, vocab_size, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    check_shardable(args, tp_size, unit="tensor-parallel ranks")
    shards = open_shards(shard_paths(ckpt_dir))
    check_against_args(shards, args)
    model = build_empty(args, dtype)
    weights = {}
    keys = [k for k in shards[0] if k not in NOT_LOADED]
    for key in tqdm(keys, desc=f"loading {ckpt_dir.name}", disable=tp_rank != 0 or len(keys) < 50, leave=False):
        piece = rank_slice(key, [shard[key] for shard in shards], tp_rank, tp_size)
        weights[key] = piece.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False)
    model.setup_caches(max_batch_size, max_seq_len, kv_cache)
    return model.eval()


def build_empty(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    """The model with uninitialised CPU weights, to be replaced by `load_state_dict(assign=True)`.

    fairscale's layers allocate with the legacy `torch.Tensor(...)` constructor, which ignores
    `torch.device("meta")`; building in the target dtype at least halves that transient memory
    for 16-bit models, and with one rank the pages are never touched.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Transformer(args)
    finally:
        torch.set_default_dtype(previous)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full (1-shard) Meta-layout state dict with random weights, for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in full_shapes(args).items():
        if key.endswith("norm.weight"):
            state[key] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)
    exponents = torch.arange(0, args.head_dim, 2).float() / args.head_dim
    state["rope.freqs"] = (1.0 / args.rope_theta**exponents).to(dtype)
    return state


def shard_state_dict(state: Mapping[str, torch.Tensor], rank: int, n_ranks: int) -> dict[str, torch.Tensor]:
    """Rank `rank` of an n_ranks-way split of a full state dict (copies, ready to save)."""
    return {k: rank_slice(k, [v], rank, n_ranks).clone() for k, v in state.items()}
