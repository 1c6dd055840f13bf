"""Files on disk, the one place for how this project reads and writes them.

- Reading: `load_file` (torch.load with weights only: no pickled code runs), `read_json` (config
  files), `read_safetensors`.
- Writing one file: `atomic_write` and its variants go through a temporary name in the target
  folder and a rename, so a reader never sees half a file.
- Writing a folder of files (a converted checkpoint, a training run's model): `Staging` holds them
  in a hidden folder until all are complete, `publish` moves each in, and the manifest
  (`write_manifest`, one schema for every folder this project writes) goes last, so its presence
  means "complete".
- Sizes: `parse_size` reads '12GiB', '5GB', ...
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from llama.errors import UserError

STAGING = ".split_model.partial"  # hidden folder a folder-writer fills before publishing
MANIFEST = "manifest.json"
GiB = 2**30
_UNITS = {"": GiB, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": GiB, "gib": GiB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """'12GiB', '12G' (GiB), '12GB' (10^9), '11000MiB', '12' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read memory size '{text}': write e.g. 12GiB, 12GB or 11000MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


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
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read {path}: it is truncated, corrupt or not a torch checkpoint ({reason})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; an unreadable file is a UserError."""
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign or truncated files
        raise UserError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through a temporary file in the target directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path: Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: Path) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_copy(src: Path, path: Path) -> Path:
    """Copy a file under its final name only once complete."""
    with open(src, "rb") as f:
        return atomic_write(path, lambda out: shutil.copyfileobj(f, out))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def flush_and_describe(path: Path) -> dict:
    """fsync a finished file (so the rename publishes complete data); its manifest entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def describe_file(path: Path, name: str | None = None) -> dict:
    """A manifest entry for a file already on disk."""
    path = Path(path)
    return {"name": name or path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def manifest(format: str, *, source: str, num_shards: int, dtype: str, files: list[dict], **details) -> dict:
    """The one manifest schema: what the folder holds (`format`, `num_shards`, `dtype`), where
    it came from (`source`), each file's name, size and sha256, and writer-specific `details`
    (a conversion's source format and verification, a training run's method and step)."""
    return {"format": format, "source": source, "num_shards": num_shards, "dtype": dtype, **details, "files": files}


WEIGHT_FILES = (".pth", ".safetensors", ".gguf")


def check_files(folder: Path, hashes: bool = False) -> None:
    """Check the weight files a folder's manifest.json lists (if it has one) against it: every size
    always (a stat, free), every sha256 when `hashes` (a full read: ~1 s per GB and core here). A
    mismatch is a UserError naming the file; a folder without a manifest (Meta's downloads, HF's)
    has nothing to check. Small text files (configs a user may edit) are not checked."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    entries = [e for e in read_json(path, "the folder's manifest").get("files", []) if str(e.get("name", "")).endswith(WEIGHT_FILES)]
    for entry in entries:
        name, size = entry.get("name"), entry.get("bytes")
        file = Path(folder) / str(name)
        if not file.is_file():
            raise UserError(f"{file} is missing but {path} lists it: the copy is incomplete; copy it again or re-run the command that wrote it")
        actual = file.stat().st_size
        if size is not None and actual != size:
            damage = "truncated" if actual < size else "longer than written"
            raise UserError(f"{file} is {actual} bytes but {path} says {size}: the file is {damage}; copy it again or re-run the command that wrote it")
    for entry in entries if hashes else ():
        file = Path(folder) / str(entry["name"])
        if entry.get("sha256") and file_sha256(file) != entry["sha256"]:
            raise UserError(f"{file} does not match the sha256 in {path}: the file is corrupt; copy it again or re-run the command that wrote it")


def write_manifest(folder: Path, content: dict) -> Path:
    """Write `manifest.json` into `folder` atomically (the last file a writer writes)."""
    return atomic_write_text(json.dumps(content, indent=2) + "\n", Path(folder) / MANIFEST)


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

    def write_files(self, builders: list[tuple[str, Callable[[Path], None]]]) -> list[dict]:
        """Run each (name, write(path)) in turn; a second thread flushes and hashes each finished
        file while the next is built. Returns their manifest entries."""
        with ThreadPoolExecutor(max_workers=1) as hasher:
            finished = []
            for name, write in builders:
                write(self.path(name))
                finished.append(hasher.submit(flush_and_describe, self.path(name)))
            return [future.result() for future in finished]

    def write_text(self, name: str, text: str) -> dict:
        """A small text file (a config); its manifest entry."""
        self.path(name).write_text(text)
        return flush_and_describe(self.path(name))

    def copy(self, src: Path, name: str) -> dict:
        shutil.copyfile(src, self.path(name))
        return describe_file(self.path(name))

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is not None:
            for path in self.published:
                path.unlink(missing_ok=True)
            if self.created_out:
                shutil.rmtree(self.out_dir, ignore_errors=True)

