"""The reader interface every checkpoint format implements, and what can be said of any reader.

A `Checkpoint` knows the model's `ModelArgs` and hands out any weight under its Meta name,
already cut to one rank's slice. Readers map their files and read lazily, so rank r of N
touches only the bytes of its own slices. Formats: Meta (llama/formats/meta.py), Hugging Face
(llama/formats/hf.py); `llama.formats.open_checkpoint` picks one.
"""

from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama.errors import UserError
from llama.formats.layout import NOT_LOADED, OUTPUT, full_shapes, split_dim
from llama.formats.params import params_json
from llama.model import ModelArgs
from llama.tokenizer import locate_tokenizer


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
        return locate_tokenizer(self.path)

    def replicas(self, key: str) -> list[torch.Tensor]:
        """Every stored copy of a replicated weight (a Meta checkpoint holds one per shard); [] if
        the format stores each weight once."""
        return []

    def meta_keys(self) -> list[str]:
        """Names a Meta shard of this model holds: the model's weights (no output when tied) and Meta's `rope.freqs`."""
        return [k for k in self.keys if not (k == OUTPUT and self.tied)] + sorted(NOT_LOADED)

    def params_text(self) -> str:
        """params.json for a Meta copy of this model."""
        return params_json(self.args)

    def stated_context(self) -> Optional[int]:
        """The context length the checkpoint's own config states, if any (HF's max_position_embeddings)."""
        return None

    @property
    def n_files(self) -> Optional[int]:
        """Weight files read (Meta shards), None where that says nothing."""
        return None

    def check_consistent(self) -> None:
        """Before converting: whatever the format can check across its files (Meta: replicas agree)."""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal alone calls -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


def out_dtype(tensor_dtype: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype


def verify(source: Checkpoint, output: Checkpoint, dtype: Optional[torch.dtype], progress: bool) -> None:
    """Re-read the output and prove it equals the input: every weight read whole from the output
    is bit-identical to the input's (cast to --dtype if given); for a Meta output, every copy of
    a replicated weight too."""
    if output.args.vocab_size != source.args.vocab_size or output.keys != source.keys:
        raise UserError(f"verification failed: {output.path} does not describe the same model as the input")
    for key in tqdm(source.keys, desc="verify", unit="tensor", disable=not progress, leave=False):
        expected = source.read(key)
        expected = expected.to(out_dtype(expected.dtype, dtype))
        if not all(same_bits(expected, got) for got in [output.read(key), *output.replicas(key)]):
            raise UserError(f"verification failed: '{key}' in the output differs from the input (disk or memory fault?)")
