"""Checkpoints on disk, whatever their format, and how weights split over tensor-parallel ranks.

`SPLIT_DIMS` is the one table of which dim each weight is split on under tensor parallelism.
The loader, the resharder, the converters, the planner and the tests all read it.

`open_checkpoint(dir)` is the one entry point for reading a model: it returns a `Checkpoint`
reader for the directory's format — Meta (`params.json` + `consolidated.NN.pth`, here) or
Hugging Face (`config.json` + safetensors, `llama/hf.py`) — that knows the model's `ModelArgs`
and hands out any weight under its Meta name, already cut to one rank's slice. Readers map their
files and read lazily, so rank r of N touches only the bytes of its own slices.
"""

import json
import pickle
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from llama.errors import UserError, is_rank0
from llama.model import META_ROPE_SCALING, ModelArgs, Transformer

# Weight name (without the "layers.N." prefix) -> dim split across tensor-parallel ranks, or
# None when every rank holds a full copy. Column-parallel layers split their outputs (dim 0),
# row-parallel layers their inputs (dim 1). The embedding has two layouts: fairscale's
# ParallelEmbedding (Llama 1/2) splits the embedding dim, the entry below; Meta's Llama 3 code
# uses VocabParallelEmbedding, splitting the vocabulary (dim 0): see `split_dim(vocab_parallel=)`.
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

EMBEDDING = "tok_embeddings.weight"
OUTPUT = "output.weight"
# A vocabulary this large is Llama 3's (128256); such Meta files split the embedding on the vocab.
LLAMA3_MIN_VOCAB = 128000
# params.json keys of Llama 3.x releases that do not change a text model's forward pass.
IGNORED_PARAMS = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "vision_model",
                  "quantization_args", "moe_args"}
# Newer Meta params.json spellings of the RoPE scaling constants -> HF's names used in ModelArgs.rope_scaling.
META_ROPE_KEYS = {"rope_scaling_factor": "factor", "rope_high_freq_factor": "high_freq_factor"}
PARTIAL = ".split_model.partial"  # hidden folder a conversion writes into before publishing

_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_dim(key: str, vocab_parallel: bool = False) -> Optional[int]:
    """The dim `key` is split on across ranks, None if replicated; unknown keys are an error.

    `vocab_parallel`: the checkpoint's embedding is split on the vocabulary (Llama 3 layout).
    """
    name = _LAYER_PREFIX.sub("", key)
    if name not in SPLIT_DIMS:
        raise UserError(f"unknown weight '{key}' in checkpoint: not a Llama weight this project knows how to shard")
    return 0 if vocab_parallel and name == EMBEDDING else SPLIT_DIMS[name]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_json(path: Path, missing: str) -> dict:
    """The JSON object in `path` (a config file); a missing, malformed or non-object file is a
    UserError, `missing` saying what the file is for."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: {missing}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config


def read_params(path: Path) -> dict:
    """params.json as a dict; missing or malformed files are a UserError."""
    return read_json(path, "a model directory needs params.json (Meta layout)")


def model_args(params: Mapping, vocab_size: Optional[int] = None, source: str = "params.json", **overrides) -> ModelArgs:
    """ModelArgs from params.json; `vocab_size: -1` is filled from the tokenizer, a mismatch is an error.

    Keys of Llama 3.x releases that do not change the text forward (vision, quantization) are
    dropped with a note on stderr; truly unknown keys are an error. `source` names the file the
    params came from in messages (config.json for a Hugging Face folder).
    """
    params = dict(params)
    ignored = sorted(set(params) & IGNORED_PARAMS)
    if ignored and is_rank0():
        print(f"note: params.json keys {ignored} do not change the text model's forward and are ignored", file=sys.stderr)
    for key in ignored:
        del params[key]
    for meta_key, name in META_ROPE_KEYS.items():
        if meta_key in params:
            value = params.pop(meta_key)
            if value is not None:
                params["rope_scaling"] = {**(params.get("rope_scaling") or META_ROPE_SCALING), name: value}
    if overrides.get("rope_scaling"):  # override single constants over the checkpoint's (or Meta's)
        overrides["rope_scaling"] = {**(params.get("rope_scaling") or META_ROPE_SCALING), **overrides["rope_scaling"]}
    known = set(ModelArgs.__dataclass_fields__) - {"vocab_parallel_embedding"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"params.json has unknown keys {unknown}; known keys are {sorted(known)}")
    args = ModelArgs(**{**params, **overrides})
    if args.rope_scaling is not None:
        missing = sorted(set(META_ROPE_SCALING) - set(args.rope_scaling))
        if missing:
            raise UserError(f"rope_scaling {args.rope_scaling} lacks {missing}: give all of {sorted(META_ROPE_SCALING)}")
        args.rope_scaling = {k: args.rope_scaling[k] for k in META_ROPE_SCALING}
    if vocab_size is not None:
        if args.vocab_size == -1:
            args.vocab_size = vocab_size
        elif args.vocab_size != vocab_size:
            raise UserError(
                f"tokenizer has {vocab_size} tokens but {source} says vocab_size {args.vocab_size}: "
                "use the tokenizer.model that came with this checkpoint"
            )
    if args.vocab_size <= 0:
        raise UserError(f"vocab_size is unknown: set it in {source} or pass the model's tokenizer")
    if args.dim % args.n_heads:
        raise UserError(f"dim {args.dim} is not divisible by n_heads {args.n_heads} in {source}")
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
    """torch.load with weights only (no pickled code runs); an unreadable file is a UserError.

    A file whose pickle names anything but tensors and plain containers is refused in our own
    words: torch's own message suggests `weights_only=False`, which runs the file's code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(f"refusing to load {path}: it holds pickled Python objects besides tensors, which could run code; "
                        "use a checkpoint that stores only tensors (e.g. re-save its state_dict from a trusted copy)") from None
    except Exception as err:  # torch raises many types for truncated or foreign files
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


def slice_pieces(pieces: Sequence[torch.Tensor], stored_dim: Optional[int], dim: Optional[int], rank: int, n_ranks: int,
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


def rank_slice(key: str, pieces: Sequence[torch.Tensor], rank: int, n_ranks: int, vocab_parallel: bool = False) -> torch.Tensor:
    """Rank `rank`'s slice of `key` stored as `pieces` split along its own split dim."""
    dim = split_dim(key, vocab_parallel)
    return slice_pieces(pieces, dim, dim, rank, n_ranks, key)


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every weight the model loads, as Meta's files store them, in the
    model's own order (that of `Transformer.state_dict()` and of Meta's files)."""
    dim, hidden, vocab = args.dim, args.hidden_dim, args.vocab_size
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (vocab, dim)}
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
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return shapes


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


def check_against_args(shards: Sequence[Mapping[str, torch.Tensor]], args: ModelArgs) -> None:
    """Every weight params.json implies is present with its shape, and nothing unexpected is."""
    expected = full_shapes(args)
    check_names(set(shards[0]), args, "checkpoint")
    for key in sorted(shards[0]):
        shape = tuple(full_shape(key, [shard[key] for shard in shards], args.vocab_parallel_embedding))
        if key in expected and shape != expected[key]:
            raise UserError(f"'{key}' is {shape} but params.json implies {expected[key]}")


class Checkpoint:
    """A model on disk: its shape (`args`) and its weights under Meta's names, read lazily.

    Subclasses read one format each. `keys` lists the weights the model loads, in the order of
    `full_shapes` (`output.weight` included even when the files tie it to the embedding);
    `read(key, rank, n)` returns rank's slice along the key's split dim (memory-mapped where the
    format allows: do not modify it). `extra` are stored weights the model does not load
    (Meta's `rope.freqs`), kept by conversions to Meta layout.
    """

    format: str = ""
    path: Path
    args: ModelArgs
    tied: bool = False
    """No separate output weight on disk: the output layer is the embedding matrix (Llama 3.2 1B/3B)."""

    @property
    def keys(self) -> list[str]:
        return list(full_shapes(self.args))

    def read(self, key: str, rank: int = 0, n_ranks: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def shape(self, key: str) -> torch.Size:
        """The whole (unsplit) shape of a stored weight."""
        raise NotImplementedError

    def split_dim(self, key: str) -> Optional[int]:
        return split_dim(key, self.args.vocab_parallel_embedding)

    def tokenizer_file(self) -> Optional[Path]:
        """The tokenizer shipped with the weights: tokenizer.model, else original/tokenizer.model (HF Hub layout)."""
        return next((p for p in (self.path / "tokenizer.model", self.path / "original" / "tokenizer.model") if p.is_file()), None)


class MetaCheckpoint(Checkpoint):
    """Meta's layout: params.json + consolidated.00.pth .. consolidated.MM.pth, split as SPLIT_DIMS says.

    How the embedding is split is read from the files (Llama 3 shards split the vocabulary,
    Llama 1/2 shards the embedding dim); one shard holds the whole matrix, and then the
    vocabulary size decides which layout the model and any resharded output use.
    """

    format = "meta"

    def __init__(self, path: Path, vocab_size: Optional[int] = None, **overrides):
        self.path = Path(path)
        params = read_params(self.path / "params.json")
        self.paths = shard_paths(self.path)
        self.shards = open_shards(self.paths)
        stored = self.shards[0]
        if vocab_size is None and params.get("vocab_size", -1) == -1 and EMBEDDING in stored:
            vocab_size = stored[EMBEDDING].shape[0]  # Llama 1/2 originals split dim 1: rows are the vocabulary
        self.args = model_args(params, vocab_size, **overrides)
        self.args.vocab_parallel_embedding = self._vocab_parallel(stored.get(EMBEDDING))
        self.tied = OUTPUT not in stored and EMBEDDING in stored
        check_against_args(self.shards, self.args)
        self.extra = [k for k in stored if k in NOT_LOADED]

    def _vocab_parallel(self, embedding: Optional[torch.Tensor]) -> bool:
        if embedding is None:
            return False
        if len(self.shards) > 1:
            return embedding.shape[0] * len(self.shards) == self.args.vocab_size and embedding.shape[1] == self.args.dim
        return self.args.vocab_size >= LLAMA3_MIN_VOCAB

    def pieces(self, key: str) -> list[torch.Tensor]:
        return [shard[key] for shard in self.shards]

    def read(self, key: str, rank: int = 0, n_ranks: int = 1) -> torch.Tensor:
        source = EMBEDDING if key == OUTPUT and self.tied else key
        return slice_pieces(self.pieces(source), self.split_dim(source), self.split_dim(key), rank, n_ranks, key)

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][EMBEDDING if key == OUTPUT and self.tied else key].dtype

    def shape(self, key: str) -> torch.Size:
        source = EMBEDDING if key == OUTPUT and self.tied else key
        return full_shape(source, self.pieces(source), self.args.vocab_parallel_embedding)


def model_format(path: str | Path) -> str:
    """'meta' (params.json) or 'hf' (config.json); anything else, e.g. a folder left by an
    interrupted conversion, is a UserError saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} not found")
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    if (path / PARTIAL).is_dir():
        raise UserError(f"{path} holds only the partial output of an interrupted conversion ({PARTIAL}): "
                        "rerun the split_model.py command that writes it")
    raise UserError(f"{path} is not a model directory: it needs params.json (Meta layout) or config.json (Hugging Face)")


def open_checkpoint(path: str | Path, vocab_size: Optional[int] = None, **overrides) -> Checkpoint:
    """The reader for the model directory `path`, chosen by its config file (see `model_format`).

    `vocab_size` (the tokenizer's) must match the model's; `overrides` replace ModelArgs fields
    (max_seq_len, ...).
    """
    if model_format(path) == "meta":
        return MetaCheckpoint(Path(path), vocab_size, **overrides)
    from llama.hf import HFCheckpoint

    return HFCheckpoint(Path(path), vocab_size, **overrides)


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
    quantize=None,
    **overrides,
) -> Transformer:
    """Load this rank's slice of a checkpoint (any format, any shard count) into a model split over tp_size ranks.

    The KV caches are allocated for generation; training passes kv_cache=False (RoPE table only).
    `quantize` (a --quantize value, llama/quantize.py) quantizes each linear's slice as soon as it
    is read, so a rank holds its quantized slices plus one unquantized tensor at a time.
    `overrides` replace ModelArgs fields (e.g. rope_scaling).
    """
    from tqdm import tqdm

    from llama import quantize as quant

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
    return {k: rank_slice(k, [v], rank, n_ranks, vocab_parallel).clone() for k, v in state.items()}
