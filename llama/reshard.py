"""Write a checkpoint in another layout, streaming and verified: Meta N shards, HF folder, GGUF.

The input is any `checkpoint.Checkpoint` reader (Meta or HF). A Meta N-shard output holds, for
rank r, exactly the slices the loader would give rank r of N (`Checkpoint.read`), so it is what a
Meta N-way checkpoint holds. Memory stays bounded: one output file is built (its tensors copied
out of the mapped inputs), saved under a temporary name, and freed before the next. Nothing lands
under its final name until every file is written (and verified, with --verify); `manifest.json`
is written last, so its presence means "complete".
"""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from llama.checkpoint import NOT_LOADED, OUTPUT, PARTIAL, Checkpoint, MetaCheckpoint, check_shardable, open_checkpoint
from llama.errors import UserError

TOKENIZER = "tokenizer.model"
MANIFEST = "manifest.json"
STAGING = PARTIAL  # hidden folder in OUT holding the files until they are complete
OUT_FORMATS = ("meta", "hf", "gguf")


def shard_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.pth"


def default_out_dir(ckpt_dir: Path, out_format: str, num_shards: int) -> Path:
    """`<DIR>_mp<N>`, `<DIR>_hf` or `<DIR>_gguf` beside the input (git-ignored by the project)."""
    ckpt_dir = Path(ckpt_dir).resolve()
    suffix = f"mp{num_shards}" if out_format == "meta" else out_format
    return ckpt_dir.parent / f"{ckpt_dir.name}_{suffix}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal alone calls -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


def check_replicas_agree(ckpt: Checkpoint) -> None:
    """Meta input: pieces of one weight share a dtype; a replicated weight is bit-identical in every shard."""
    if not isinstance(ckpt, MetaCheckpoint):
        return
    for key in ckpt.shards[0]:
        pieces = ckpt.pieces(key)
        for path, piece in zip(ckpt.paths[1:], pieces[1:]):
            if piece.dtype != pieces[0].dtype:
                raise UserError(f"'{key}' is {piece.dtype} in {path.name} but {pieces[0].dtype} in {ckpt.paths[0].name}")
            if ckpt.split_dim(key) is None and not same_bits(piece, pieces[0]):
                raise UserError(f"replicated weight '{key}' differs between {ckpt.paths[0].name} and {path.name}: corrupt shard?")


def meta_keys(ckpt: Checkpoint) -> list[str]:
    """Names a Meta shard of this model holds: a Meta input's own (in its order), else the model's
    weights (no output when tied) and Meta's `rope.freqs`."""
    if isinstance(ckpt, MetaCheckpoint):
        return list(ckpt.shards[0])
    return [k for k in ckpt.keys if not (k == OUTPUT and ckpt.tied)] + sorted(NOT_LOADED)


def out_dtype(tensor_dtype: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype


def out_tensor(ckpt: Checkpoint, key: str, rank: int, num_shards: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
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
    for key in meta_keys(ckpt):
        copies = 1 if ckpt.split_dim(key) is not None else num_shards
        total += ckpt.shape(key).numel() * out_dtype(ckpt.dtype(key), dtype).itemsize * copies
    return total


def check_out_dir(out_dir: Path, ckpt: Checkpoint, needed: int, force: bool) -> None:
    """OUT is not the input, is empty unless --force (a partial folder left by a killed run
    does not count), and its disk has room for the output."""
    if out_dir.resolve() == ckpt.path.resolve():
        raise UserError(f"--out_dir {out_dir} is the input directory: choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} exists and is not a directory")
    leftovers = [p for p in out_dir.iterdir() if p.name != STAGING] if out_dir.is_dir() else []
    if leftovers and not force:
        raise UserError(f"output directory {out_dir} exists and is not empty: pass --force to replace its files, or choose another --out_dir")
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

    On any exception (Ctrl-C and SIGTERM included) the folder and every file published so far
    are removed, and OUT itself when this run created it, so a failed run leaves nothing behind.
    A folder left by a run killed with SIGKILL is replaced by the next run.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tmp = out_dir / STAGING
        self.published: list[Path] = []
        self.created_out = False

    def __enter__(self) -> "Staging":
        self.created_out = not self.out_dir.exists() or not any(p.name != STAGING for p in self.out_dir.iterdir())
        shutil.rmtree(self.tmp, ignore_errors=True)
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


def flush_and_describe(path: Path) -> dict:
    """fsync a finished file (so the rename publishes complete data); its manifest entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_files(builders: list[tuple[str, Callable[[Path], None]]], staging: Staging) -> list[dict]:
    """Run each (name, write(path)) in turn; a second thread flushes and hashes each finished file
    while the next is built."""
    with ThreadPoolExecutor(max_workers=1) as hasher:
        finished = []
        for name, write in builders:
            write(staging.path(name))
            finished.append(hasher.submit(flush_and_describe, staging.path(name)))
        return [future.result() for future in finished]


def meta_params(ckpt: Checkpoint) -> str:
    """params.json text: a Meta input's own file verbatim, else written from the model's args."""
    if isinstance(ckpt, MetaCheckpoint):
        return (ckpt.path / "params.json").read_text()
    from llama.hf import params_from_args

    return json.dumps(params_from_args(ckpt.args), indent=2) + "\n"


def write_meta(ckpt: Checkpoint, staging: Staging, num_shards: int, dtype: Optional[torch.dtype], progress: bool) -> list[dict]:
    """Build, save and free one Meta shard at a time, then params.json; returns their manifest entries."""
    check_shardable(ckpt.args, num_shards)
    keys = meta_keys(ckpt)

    def shard_writer(rank: int) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            bar = tqdm(keys, desc=f"{path.name} ({rank + 1}/{num_shards})", unit="tensor", disable=not progress, leave=False)
            torch.save({key: out_tensor(ckpt, key, rank, num_shards, dtype) for key in bar}, path)
        return write

    files = write_files([(shard_name(rank), shard_writer(rank)) for rank in range(num_shards)], staging)
    staging.path("params.json").write_text(meta_params(ckpt))
    return files + [flush_and_describe(staging.path("params.json"))]


def verify(source: Checkpoint, output: Checkpoint, dtype: Optional[torch.dtype], progress: bool) -> None:
    """Re-read the output and prove it equals the input: every weight read whole from the output
    is bit-identical to the input's (cast to --dtype if given); for a Meta output, every copy of
    a replicated weight too."""
    if output.args.vocab_size != source.args.vocab_size or output.keys != source.keys:
        raise UserError(f"verification failed: {output.path} does not describe the same model as the input")
    for key in tqdm(source.keys, desc="verify", unit="tensor", disable=not progress, leave=False):
        expected = source.read(key)
        expected = expected.to(out_dtype(expected.dtype, dtype))
        if not all(same_bits(expected, got) for got in [output.read(key), *replicas(output, key)]):
            raise UserError(f"verification failed: '{key}' in the output differs from the input (disk or memory fault?)")


def replicas(ckpt: Checkpoint, key: str) -> list[torch.Tensor]:
    """Every shard's copy of a replicated weight of a Meta checkpoint (none for other weights)."""
    stored = isinstance(ckpt, MetaCheckpoint) and not (key == OUTPUT and ckpt.tied)
    return ckpt.pieces(key) if stored and ckpt.split_dim(key) is None else []


def copy_file(src: Path, staging: Staging, name: str) -> dict:
    shutil.copyfile(src, staging.path(name))
    return {"name": name, "bytes": src.stat().st_size, "sha256": file_sha256(src)}


def convert(
    ckpt_dir: Path,
    out_format: str = "meta",
    num_shards: int = 1,
    out_dir: Optional[Path] = None,
    dtype: Optional[str | torch.dtype] = None,
    force: bool = False,
    verify_output: bool = False,
    progress: bool = True,
    adapter: Optional[Path] = None,
    **options,
) -> Path:
    """Write the checkpoint in `ckpt_dir` (Meta or HF) as `out_format` in out_dir; returns out_dir.

    meta: `num_shards` consolidated.NN.pth (dtype None keeps each tensor's); hf: one HF folder;
    gguf: model.gguf (dtype a GGUF type name). `adapter` (a LoRA adapter) is merged into the
    weights as they are read. Everything is validated before the first byte is written; on any
    error or interruption nothing is left in out_dir.
    """
    if out_format not in OUT_FORMATS:
        raise UserError(f"unknown --out_format '{out_format}': choose one of {', '.join(OUT_FORMATS)}")
    if num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {num_shards}")
    if out_format != "meta" and num_shards != 1:
        raise UserError(f"--num_shards applies to the Meta layout only; --out_format {out_format} writes one model")
    ckpt = open_checkpoint(ckpt_dir)
    if adapter is not None:
        from llama.lora import merge_adapter

        ckpt = merge_adapter(ckpt, Path(adapter))
    if out_format == "meta":
        check_shardable(ckpt.args, num_shards)
    writer = _writer(out_format)
    prepared = writer.prepare(ckpt, dtype, **options)  # checks options before anything is written
    check_replicas_agree(ckpt)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt.path, out_format, num_shards)
    check_out_dir(out_dir, ckpt, writer.needed_bytes(ckpt, num_shards, prepared), force)
    with Staging(out_dir) as staging:
        files = writer.write(ckpt, staging, num_shards, prepared, progress)
        if verify_output:
            writer.verify(ckpt, staging, prepared, progress)
        tokenizer = ckpt.tokenizer_file()
        if tokenizer is not None and not any(f["name"] == TOKENIZER for f in files):
            files.append(copy_file(tokenizer, staging, TOKENIZER))
        remove_replaced(out_dir, {f["name"] for f in files})
        for f in files:
            staging.publish(f["name"])
        write_manifest(staging, ckpt, out_format, num_shards, prepared, files, verify_output)
    return out_dir


def reshard(ckpt_dir: Path, num_shards: int, out_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None,
            force: bool = False, verify_output: bool = False, progress: bool = True) -> Path:
    """Meta M shards (or an HF folder) -> Meta N shards; see `convert`."""
    return convert(ckpt_dir, "meta", num_shards, out_dir, dtype, force, verify_output, progress)


class MetaWriter:
    """The Meta N-shard layout (the resharder proper)."""

    @staticmethod
    def prepare(ckpt: Checkpoint, dtype, **options) -> Optional[torch.dtype]:
        if options:
            raise UserError(f"options {sorted(options)} do not apply to the Meta layout")
        from llama.checkpoint import parse_dtype

        return dtype if dtype is None or isinstance(dtype, torch.dtype) else parse_dtype(dtype)

    @staticmethod
    def needed_bytes(ckpt: Checkpoint, num_shards: int, dtype) -> int:
        return output_bytes(ckpt, num_shards, dtype) + num_shards * 2**20  # + zip headers, generously

    @staticmethod
    def write(ckpt, staging, num_shards, dtype, progress) -> list[dict]:
        return write_meta(ckpt, staging, num_shards, dtype, progress)

    @staticmethod
    def verify(ckpt, staging, dtype, progress) -> None:
        verify(ckpt, MetaCheckpoint(staging.tmp), dtype, progress)

    @staticmethod
    def describe(ckpt, dtype) -> str:
        names = sorted({str(out_dtype(ckpt.dtype(k), dtype)).removeprefix("torch.") for k in meta_keys(ckpt)})
        return ",".join(names)


def _writer(out_format: str):
    if out_format == "hf":
        from llama.hf import HFWriter

        return HFWriter
    if out_format == "gguf":
        from llama.gguf_export import GGUFWriter

        return GGUFWriter
    return MetaWriter


def remove_replaced(out_dir: Path, names: set[str]) -> None:
    """With --force, drop what a previous run left that this one does not rewrite: extra shards
    would make OUT look like a larger checkpoint, and a stale manifest would vouch for them."""
    patterns = ("consolidated.*.pth", "*.safetensors", "model.safetensors.index.json", "*.gguf",
                "config.json", "generation_config.json", "params.json", TOKENIZER, MANIFEST)
    for pattern in patterns:
        for path in out_dir.glob(pattern):
            if path.name not in names:
                path.unlink(missing_ok=True)


def write_manifest(staging: Staging, ckpt: Checkpoint, out_format: str, num_shards: int, prepared, files: list[dict], verified: bool) -> None:
    manifest = {
        "source": str(ckpt.path.resolve()),
        "source_format": ckpt.format,
        "source_shards": len(getattr(ckpt, "paths", [])) or None,
        "format": out_format,
        "num_shards": num_shards,
        "dtype": _writer(out_format).describe(ckpt, prepared),
        "verified": verified,
        "files": files,
    }
    staging.path(MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    staging.publish(MANIFEST)
