"""Write a checkpoint in another layout, streaming and verified: Meta N shards, HF folder, GGUF.

The input is any reader (`llama.formats.open_checkpoint`: Meta or HF), optionally wrapped so an
adapter is merged as it is read; the output is written by the format's writer from
`llama.formats.WRITERS`. Every check runs before the first byte is written. Files go into a
hidden staging folder (`llama.files.Staging`) and nothing lands under its final name until every
file is written (and verified, with --verify); `manifest.json` is written last, so its presence
means "complete".
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from llama.errors import UserError
from llama.files import MANIFEST, STAGING, Staging, manifest
from llama.formats import OUT_FORMATS, WRITERS, open_checkpoint
from llama.formats.adapters import MergedCheckpoint
from llama.formats.checkpoint import Checkpoint
from llama.formats.layout import check_shardable
from llama.tokenizer import TOKENIZER


def default_out_dir(ckpt_dir: Path, out_format: str, num_shards: int, merged: bool = False) -> Path:
    """`<DIR>_mp<N>`, `<DIR>_hf` or `<DIR>_gguf` beside the input (git-ignored by the project);
    with an adapter merged in, `<DIR>_merged_...`, so a merge never collides with a plain split."""
    ckpt_dir = Path(ckpt_dir).resolve()
    suffix = f"mp{num_shards}" if out_format == "meta" else out_format
    return ckpt_dir.parent / f"{ckpt_dir.name}{'_merged' * merged}_{suffix}"


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


def convert(
    ckpt_dir: Path,
    *,
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
    ckpt = open_checkpoint(ckpt_dir, verify=verify_output)  # --verify checks the input against its own manifest first
    if adapter is not None:
        ckpt = MergedCheckpoint(ckpt, Path(adapter))
    if out_format == "meta":
        check_shardable(ckpt.args, num_shards)
    writer = WRITERS[out_format]
    prepared = writer.prepare(ckpt, dtype, **options)  # checks options before anything is written
    ckpt.check_consistent()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt.path, out_format, num_shards, adapter is not None)
    check_out_dir(out_dir, ckpt, writer.needed_bytes(ckpt, num_shards, prepared), force)
    with Staging(out_dir) as staging:
        files = writer.write(ckpt, staging, num_shards=num_shards, prepared=prepared, progress=progress)
        if verify_output:
            writer.verify(ckpt, staging, prepared, progress)
        tokenizer = ckpt.tokenizer_file()
        if tokenizer is not None and not any(f["name"] == TOKENIZER for f in files):
            files.append(staging.copy(tokenizer, TOKENIZER))
        remove_replaced(out_dir, {f["name"] for f in files})
        for f in files:
            staging.publish(f["name"])
        content = manifest(out_format, source=str(ckpt.path.resolve()), num_shards=num_shards, dtype=writer.describe(ckpt, prepared), files=files,
                           source_format=ckpt.format, source_shards=ckpt.n_files, verified=verify_output)
        staging.write_text(MANIFEST, json.dumps(content, indent=2) + "\n")
        staging.publish(MANIFEST)
    return out_dir


def reshard(ckpt_dir: Path, *, num_shards: int, out_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None,
            force: bool = False, verify_output: bool = False, progress: bool = True) -> Path:
    """Meta M shards (or an HF folder) -> Meta N shards; see `convert`."""
    return convert(ckpt_dir, out_format="meta", num_shards=num_shards, out_dir=out_dir, dtype=dtype, force=force, verify_output=verify_output, progress=progress)


def remove_replaced(out_dir: Path, names: set[str]) -> None:
    """With --force, drop what a previous run left that this one does not rewrite: extra shards
    would make OUT look like a larger checkpoint, and a stale manifest would vouch for them."""
    patterns = ("consolidated.*.pth", "*.safetensors", "model.safetensors.index.json", "*.gguf",
                "config.json", "generation_config.json", "params.json", TOKENIZER, MANIFEST)
    for pattern in patterns:
        for path in out_dir.glob(pattern):
            if path.name not in names:
                path.unlink(missing_ok=True)
