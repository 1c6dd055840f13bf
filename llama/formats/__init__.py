"""Checkpoint formats: one reader per format behind `open_checkpoint`, one writer per output format.

Readers (`Checkpoint` subclasses) hand out weights under Meta's names cut to a rank's slice;
writers (`WRITERS`) stream a reader's weights into another layout. The conversion driver
(llama/formats/convert.py) receives a writer from this table and never imports a format itself.
"""

from pathlib import Path
from typing import Optional

from llama.errors import UserError
from llama.files import STAGING
from llama.formats.checkpoint import Checkpoint
from llama.formats.gguf import GGUFWriter
from llama.formats.hf import CONFIG, HFCheckpoint, HFWriter
from llama.formats.meta import MetaCheckpoint, MetaWriter
from llama.formats.params import PARAMS

READERS = {"meta": MetaCheckpoint, "hf": HFCheckpoint}
WRITERS = {"meta": MetaWriter, "hf": HFWriter, "gguf": GGUFWriter}
OUT_FORMATS = tuple(WRITERS)


def model_format(path: str | Path) -> str:
    """'meta' (params.json) or 'hf' (config.json); anything else, e.g. a folder left by an
    interrupted conversion, is a UserError saying what it is."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{path} is a file, not a model directory: pass the folder that holds params.json (Meta) or config.json (Hugging Face)")
    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} not found")
    if (path / PARAMS).is_file():
        return "meta"
    if (path / CONFIG).is_file():
        return "hf"
    if (path / STAGING).is_dir():
        raise UserError(f"{path} holds only the partial output of an interrupted conversion ({STAGING}): "
                        "rerun the split_model.py command that writes it")
    raise UserError(f"{path} is not a model directory: it needs {PARAMS} (Meta layout) or {CONFIG} (Hugging Face)")


def open_checkpoint(path: str | Path, vocab_size: Optional[int] = None, *, verify: bool = False, **overrides) -> Checkpoint:
    """The reader for the model directory `path`, chosen by its config file (see `model_format`).

    `vocab_size` (the tokenizer's) must match the model's; `overrides` replace ModelArgs fields
    (max_seq_len, ...). The files are checked against the folder's manifest.json if it has one:
    sizes always, sha256 with `verify`.
    """
    return READERS[model_format(path)](Path(path), vocab_size, verify=verify, **overrides)
