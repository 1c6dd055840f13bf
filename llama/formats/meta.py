"""Meta's layout: params.json + consolidated.00.pth .. consolidated.MM.pth, read and written.

The reader memory-maps every shard and cuts any rank's slice out of the pieces (any M shards on
any N ranks). The writer (`--out_format meta`, the resharder proper) writes, for rank r of N,
exactly the slices the loader would give rank r of N, so its output is what a Meta N-way
checkpoint holds. Memory stays bounded: one shard is built (its tensors copied out of the mapped
inputs), saved, and freed before the next.
"""

import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from llama.config import parse_dtype
from llama.errors import UserError
from llama.files import Staging, check_files, load_file
from llama.formats.checkpoint import Checkpoint, out_dtype, same_bits, verify
from llama.formats.layout import (
    EMBEDDING,
    LLAMA3_MIN_VOCAB,
    NOT_LOADED,
    OUTPUT,
    check_names,
    check_shardable,
    full_shape,
    full_shapes,
    shard_name,
    slice_pieces,
)
from llama.formats.params import PARAMS, model_args, read_params
from llama.model import ModelArgs

_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


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


def check_against_args(shards: Sequence[Mapping[str, torch.Tensor]], args: ModelArgs) -> None:
    """Every weight params.json implies is present with its shape, and nothing unexpected is."""
    expected = full_shapes(args)
    check_names(set(shards[0]), args, "checkpoint")
    for key in sorted(shards[0]):
        shape = tuple(full_shape(key, [shard[key] for shard in shards], args.vocab_parallel_embedding))
        if key in expected and shape != expected[key]:
            raise UserError(f"'{key}' is {shape} but params.json implies {expected[key]}")


class MetaCheckpoint(Checkpoint):
    """Meta's layout: params.json + consolidated.00.pth .. consolidated.MM.pth, split as SPLIT_DIMS says.

    How the embedding is split is read from the files (Llama 3 shards split the vocabulary,
    Llama 1/2 shards the embedding dim); one shard holds the whole matrix, and then the
    vocabulary size decides which layout the model and any resharded output use.
    """

    format = "meta"

    def __init__(self, path: Path, vocab_size: Optional[int] = None, verify: bool = False, **overrides):
        self.path = Path(path)
        check_files(self.path, hashes=verify)
        params = read_params(self.path / PARAMS)
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
        return slice_pieces(self.pieces(source), stored_dim=self.split_dim(source), dim=self.split_dim(key), rank=rank, n_ranks=n_ranks, key=key)

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][EMBEDDING if key == OUTPUT and self.tied else key].dtype

    def shape(self, key: str) -> torch.Size:
        source = EMBEDDING if key == OUTPUT and self.tied else key
        return full_shape(source, self.pieces(source), self.args.vocab_parallel_embedding)

    def replicas(self, key: str) -> list[torch.Tensor]:
        stored = not (key == OUTPUT and self.tied)
        return self.pieces(key) if stored and self.split_dim(key) is None else []

    def meta_keys(self) -> list[str]:
        return list(self.shards[0])  # a Meta input's own names, in its order

    def params_text(self) -> str:
        return (self.path / PARAMS).read_text()  # verbatim

    @property
    def n_files(self) -> int:
        return len(self.paths)

    def check_consistent(self) -> None:
        self.check_replicas_agree()

    def check_replicas_agree(self) -> None:
        """Pieces of one weight share a dtype; a replicated weight is bit-identical in every shard."""
        for key in self.shards[0]:
            pieces = self.pieces(key)
            for path, piece in zip(self.paths[1:], pieces[1:]):
                if piece.dtype != pieces[0].dtype:
                    raise UserError(f"'{key}' is {piece.dtype} in {path.name} but {pieces[0].dtype} in {self.paths[0].name}")
                if self.split_dim(key) is None and not same_bits(piece, pieces[0]):
                    raise UserError(f"replicated weight '{key}' differs between {self.paths[0].name} and {path.name}: corrupt shard?")


def out_tensor(ckpt: Checkpoint, key: str, *, rank: int, num_shards: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Rank `rank`'s tensor as a compact tensor of its own.

    torch.save writes a view's whole storage, so a slice that is a view into a bigger (mapped)
    storage is copied; a tensor that is already whole (its own storage) is used as it is.
    """
    piece = ckpt.read(key, rank, num_shards)
    whole = piece.is_contiguous() and piece.untyped_storage().nbytes() == piece.nbytes
    return piece.to(out_dtype(piece.dtype, dtype), memory_format=torch.contiguous_format, copy=not whole)


def output_bytes(ckpt: Checkpoint, num_shards: int, dtype: Optional[torch.dtype]) -> int:
    """Tensor bytes of all output files together: split weights once, replicated ones N times."""
    total = 0
    for key in ckpt.meta_keys():
        copies = 1 if ckpt.split_dim(key) is not None else num_shards
        total += ckpt.shape(key).numel() * out_dtype(ckpt.dtype(key), dtype).itemsize * copies
    return total


def write_meta(ckpt: Checkpoint, staging: Staging, *, num_shards: int, dtype: Optional[torch.dtype], progress: bool) -> list[dict]:
    """Build, save and free one Meta shard at a time, then params.json; returns their manifest entries."""
    check_shardable(ckpt.args, num_shards)
    keys = ckpt.meta_keys()

    def shard_writer(rank: int) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            bar = tqdm(keys, desc=f"{path.name} ({rank + 1}/{num_shards})", unit="tensor", disable=not progress, leave=False)
            torch.save({key: out_tensor(ckpt, key, rank=rank, num_shards=num_shards, dtype=dtype) for key in bar}, path)
        return write

    files = staging.write_files([(shard_name(rank), shard_writer(rank)) for rank in range(num_shards)])
    return files + [staging.write_text(PARAMS, ckpt.params_text())]


class MetaWriter:
    """The Meta N-shard layout (the resharder proper)."""

    @staticmethod
    def prepare(ckpt: Checkpoint, dtype, **options) -> Optional[torch.dtype]:
        if options:
            raise UserError(f"options {sorted(options)} do not apply to the Meta layout")
        return dtype if dtype is None or isinstance(dtype, torch.dtype) else parse_dtype(dtype)

    @staticmethod
    def needed_bytes(ckpt: Checkpoint, num_shards: int, dtype) -> int:
        return output_bytes(ckpt, num_shards, dtype) + num_shards * 2**20  # + zip headers, generously

    @staticmethod
    def write(ckpt, staging, *, num_shards, prepared, progress) -> list[dict]:
        return write_meta(ckpt, staging, num_shards=num_shards, dtype=prepared, progress=progress)

    @staticmethod
    def verify(ckpt, staging, dtype, progress) -> None:
        verify(ckpt, MetaCheckpoint(staging.tmp), dtype, progress)

    @staticmethod
    def describe(ckpt, dtype) -> str:
        names = sorted({str(out_dtype(ckpt.dtype(k), dtype)).removeprefix("torch.") for k in ckpt.meta_keys()})
        return ",".join(names)
