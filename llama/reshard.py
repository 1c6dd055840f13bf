"""Reshard a Meta checkpoint from M to N tensor-parallel shards, streaming, verified.

Every output tensor is `checkpoint.rank_slice` of the memory-mapped inputs, the same slice the
loader would give rank r of N, so an N-shard output is exactly what a Meta N-way checkpoint
holds. Memory stays bounded: one output shard is built (its slices copied out of the mapped
inputs, so anonymous memory holds that one shard), saved under a temporary name, and freed
before the next. Nothing lands under its final name until every shard is written (and
verified, with --verify); `manifest.json` is written last, so its presence means "complete".
"""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama.checkpoint import (
    check_against_args,
    check_shardable,
    model_args,
    open_shards,
    rank_slice,
    read_params,
    shard_paths,
    split_dim,
)
from llama.errors import UserError
from llama.model import ModelArgs

TOKENIZER = "tokenizer.model"
MANIFEST = "manifest.json"
STAGING = ".split_model.partial"  # hidden folder in OUT holding the files until they are complete


@dataclass
class Source:
    """A validated input checkpoint: its memory-mapped shards and the model shape."""

    ckpt_dir: Path
    paths: list[Path]
    shards: list[dict[str, torch.Tensor]]
    args: ModelArgs

    @property
    def keys(self) -> list[str]:
        return list(self.shards[0])

    def pieces(self, key: str) -> list[torch.Tensor]:
        return [shard[key] for shard in self.shards]


def shard_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.pth"


def default_out_dir(ckpt_dir: Path, num_shards: int) -> Path:
    """`<DIR>_mp<N>` beside the input (git-ignored by the project's `*_mp[0-9]*/`)."""
    ckpt_dir = ckpt_dir.resolve()
    return ckpt_dir.parent / f"{ckpt_dir.name}_mp{num_shards}"


def open_checkpoint(ckpt_dir: Path) -> Source:
    """Map every shard and check it against params.json before anything is written.

    Checks: shard numbering has no gaps, each file is a readable dict of tensors, names,
    shapes and dtypes agree across shards, replicated weights are equal in every shard, and
    the full shapes are the ones params.json implies. `vocab_size: -1` (Meta's originals)
    is taken from the rows of `tok_embeddings.weight`.
    """
    ckpt_dir = Path(ckpt_dir)
    paths = shard_paths(ckpt_dir)
    params = read_params(ckpt_dir / "params.json")
    shards = open_shards(paths)
    for path, shard in zip(paths, shards):
        if not isinstance(shard, dict) or not all(isinstance(v, torch.Tensor) for v in shard.values()):
            raise UserError(f"{path} is not a dict of tensors: not a Meta consolidated.NN.pth shard")
    embedding = shards[0].get("tok_embeddings.weight")
    vocab = embedding.shape[0] if params.get("vocab_size", -1) == -1 and embedding is not None else None
    args = model_args(params, vocab)
    check_against_args(shards, args)
    source = Source(ckpt_dir, paths, shards, args)
    for key in source.keys:
        check_pieces_agree(key, source.pieces(key), paths)
    return source


def check_pieces_agree(key: str, pieces: list[torch.Tensor], paths: list[Path]) -> None:
    """Pieces of one weight share a dtype; a replicated weight is bit-identical in every shard."""
    for path, piece in zip(paths[1:], pieces[1:]):
        if piece.dtype != pieces[0].dtype:
            raise UserError(f"'{key}' is {piece.dtype} in {path.name} but {pieces[0].dtype} in {paths[0].name}")
        if split_dim(key) is None and not same_bits(piece, pieces[0]):
            raise UserError(f"replicated weight '{key}' differs between {paths[0].name} and {path.name}: corrupt shard?")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal alone calls -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


def out_tensor(key: str, pieces: list[torch.Tensor], rank: int, num_shards: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Rank `rank`'s tensor as a compact copy of its own.

    torch.save writes a view's whole storage, so a slice still backed by an input file is
    copied; a slice that `torch.cat` already assembled is used as it is.
    """
    piece = rank_slice(key, pieces, rank, num_shards)
    target = dtype if dtype is not None and piece.is_floating_point() else piece.dtype
    backed_by_input = any(piece.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in pieces)
    return piece.to(target, memory_format=torch.contiguous_format, copy=backed_by_input)


def output_bytes(source: Source, num_shards: int, dtype: Optional[torch.dtype]) -> int:
    """Tensor bytes of all output shards together: split weights once, replicated ones N times."""
    total = 0
    for key in source.keys:
        pieces = source.pieces(key)
        size = dtype.itemsize if dtype is not None and pieces[0].is_floating_point() else pieces[0].element_size()
        numel = pieces[0].numel() * (len(pieces) if split_dim(key) is not None else num_shards)
        total += numel * size
    return total


def check_out_dir(out_dir: Path, source: Source, num_shards: int, dtype: Optional[torch.dtype], force: bool) -> None:
    """OUT is not the input, is empty unless --force, and its disk has room for the output."""
    if out_dir.resolve() == source.ckpt_dir.resolve():
        raise UserError(f"--out_dir {out_dir} is the input directory: choose another (default <DIR>_mp<N>)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"output directory {out_dir} exists and is not empty: pass --force to replace its shards, or choose another --out_dir")
    needed = output_bytes(source, num_shards, dtype) + num_shards * 2**20  # + zip headers, generously
    existing = out_dir if out_dir.is_dir() else next(p for p in out_dir.resolve().parents if p.is_dir())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(f"{out_dir} needs about {needed / 2**30:.2f} GiB but its disk has {free / 2**30:.2f} GiB free")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class Staging:
    """Files are written into a hidden folder in OUT and moved in by `publish` once complete.

    On any exception (Ctrl-C included) the folder and every file published so far are removed,
    and OUT itself when this run created it, so a failed run leaves nothing behind.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tmp = out_dir / STAGING
        self.published: list[Path] = []
        self.created_out = False

    def __enter__(self) -> "Staging":
        self.created_out = not self.out_dir.exists()
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by a run killed with SIGKILL
        self.tmp.mkdir(parents=True)
        return self

    def path(self, name: str) -> Path:
        """Where to write `name` until it is published."""
        return self.tmp / name

    def publish(self, name: str) -> None:
        os.replace(self.tmp / name, self.out_dir / name)
        self.published.append(self.out_dir / name)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is not None:
            for path in self.published:
                path.unlink(missing_ok=True)
            if self.created_out:
                shutil.rmtree(self.out_dir, ignore_errors=True)


def write_shards(source: Source, staging: Staging, num_shards: int, dtype: Optional[torch.dtype], progress: bool) -> list[dict]:
    """Build, save and free one output shard at a time; returns name, bytes, sha256 of each.

    A second thread flushes and hashes each saved file while the next shard is built.
    """
    with ThreadPoolExecutor(max_workers=1) as hasher:
        finished = []
        for rank in range(num_shards):
            name = shard_name(rank)
            keys = tqdm(source.keys, desc=f"{name} ({rank + 1}/{num_shards})", unit="tensor", disable=not progress, leave=False)
            state = {key: out_tensor(key, source.pieces(key), rank, num_shards, dtype) for key in keys}
            torch.save(state, staging.path(name))
            del state  # free this shard before building the next
            finished.append(hasher.submit(flush_and_describe, staging.path(name)))
        return [future.result() for future in finished]


def flush_and_describe(path: Path) -> dict:
    """fsync a finished file (so the rename publishes complete data); its manifest entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify(source: Source, paths: list[Path], dtype: Optional[torch.dtype], progress: bool) -> None:
    """Re-read the output and prove it equals the input: each tensor re-merged from the N
    output shards is bit-identical to the one merged from the M inputs (cast to --dtype if
    given), and every output copy of a replicated weight equals the input's."""
    outputs = open_shards(paths)
    if list(outputs[0]) != source.keys:
        raise UserError(f"verification failed: {paths[0]} does not hold the input's weight names in order")
    check_against_args(outputs, source.args)
    for key in tqdm(source.keys, desc="verify", unit="tensor", disable=not progress, leave=False):
        expected = rank_slice(key, source.pieces(key), 0, 1)
        if dtype is not None and expected.is_floating_point():
            expected = expected.to(dtype)
        pieces = [out[key] for out in outputs]
        merged = [rank_slice(key, pieces, 0, 1)] if split_dim(key) is not None else pieces
        if not all(same_bits(expected, got) for got in merged):
            raise UserError(f"verification failed: '{key}' in the output differs from the input (disk or memory fault?)")


def copy_file(src: Path, staging: Staging, name: str) -> dict:
    shutil.copyfile(src, staging.path(name))
    return {"name": name, "bytes": src.stat().st_size, "sha256": file_sha256(src)}


def reshard(
    ckpt_dir: Path,
    num_shards: int,
    out_dir: Optional[Path] = None,
    dtype: Optional[torch.dtype] = None,
    force: bool = False,
    verify_output: bool = False,
    progress: bool = True,
) -> Path:
    """Write `ckpt_dir` (M shards) as `num_shards` shards in out_dir; returns out_dir.

    `dtype` None keeps each tensor's dtype. Everything is validated before the first byte is
    written; on any error nothing is left in out_dir.
    """
    if num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {num_shards}")
    source = open_checkpoint(Path(ckpt_dir))
    check_shardable(source.args, num_shards)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(source.ckpt_dir, num_shards)
    check_out_dir(out_dir, source, num_shards, dtype, force)
    with Staging(out_dir) as staging:
        files = write_shards(source, staging, num_shards, dtype, progress)
        if verify_output:
            verify(source, [staging.path(f["name"]) for f in files], dtype, progress)
        files.append(copy_file(source.ckpt_dir / "params.json", staging, "params.json"))
        if (source.ckpt_dir / TOKENIZER).is_file():
            files.append(copy_file(source.ckpt_dir / TOKENIZER, staging, TOKENIZER))
        remove_replaced(out_dir, {f["name"] for f in files})
        for f in files:
            staging.publish(f["name"])
        write_manifest(staging, source, num_shards, dtype, files, verify_output)
    return out_dir


def remove_replaced(out_dir: Path, names: set[str]) -> None:
    """With --force, drop what a previous run left that this one does not rewrite: extra shards
    would make OUT look like a larger checkpoint, and a stale manifest would vouch for them."""
    for path in [*out_dir.glob("consolidated.*.pth"), out_dir / TOKENIZER, out_dir / MANIFEST]:
        if path.name not in names:
            path.unlink(missing_ok=True)


def write_manifest(staging: Staging, source: Source, num_shards: int, dtype: Optional[torch.dtype], files: list[dict], verified: bool) -> None:
    dtypes = sorted({str(dtype if dtype is not None and t.is_floating_point() else t.dtype).removeprefix("torch.") for t in source.shards[0].values()})
    manifest = {
        "source": str(source.ckpt_dir.resolve()),
        "source_shards": len(source.paths),
        "num_shards": num_shards,
        "dtype": ",".join(dtypes),
        "verified": verified,
        "files": files,
    }
    staging.path(MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    staging.publish(MANIFEST)
