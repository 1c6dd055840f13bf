"""LoRA adapter files: the project's `adapter.pt` and PEFT directories, read, written and merged.

- the project's `adapter.pt`: `{"format": "llama-mp-lora", "config": {...}, "weights": {...}}`
  with full (unsplit) tensors named `layers.N.attention.wq.lora.A` / `.lora.B`;
- Hugging Face PEFT's LoRA adapter directory (llama/formats/peft.py).

`MergedCheckpoint` reads a checkpoint as base + scale * B @ A, so every writer streams the merged
model; the split dims of the factors follow the base weight's (`lora_split_dims`), so no gathering
is needed.
"""

import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

from llama.errors import UserError, is_rank0
from llama.files import atomic_torch_save, load_file
from llama.formats import peft
from llama.formats.checkpoint import Checkpoint
from llama.formats.layout import lora_split_dims
from llama.lora import load_state, local_slice
from llama.model import ModelArgs, Transformer

PROJECT_FORMAT = "llama-mp-lora"


def save_adapter(full: Mapping[str, torch.Tensor], config: dict, path: Path) -> Path:
    """Write the project's format atomically: full tensors + config (rank, alpha, targets, base model)."""
    return atomic_torch_save({"format": PROJECT_FORMAT, "config": dict(config), "weights": dict(full)}, Path(path))


def load_adapter(path: Path, args: Optional[ModelArgs] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(full tensors, config) from adapter.pt or a PEFT LoRA directory (which needs the model's `args`)."""
    path = Path(path)
    if path.is_dir():
        if args is None:
            raise ValueError("reading a PEFT adapter needs the model's args (for the q/k row order)")
        return peft.import_peft(path, args)
    if not path.is_file():
        raise UserError(f"adapter {path} not found: pass an adapter.pt file or a PEFT adapter directory (train one with ft_main.py)")
    state = load_file(path, mmap=False)
    if not isinstance(state, dict) or state.get("format") != PROJECT_FORMAT:
        raise UserError(f"{path} is not a LoRA adapter written by ft_main.py (expected format '{PROJECT_FORMAT}')")
    return dict(state["weights"]), dict(state["config"])


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in float32 and returned in W's dtype."""
    return (weight.float() + scale * (B.float() @ A.float())).to(weight.dtype)


def adapter_kind(path: Path) -> str:
    """'lora' or 'prompt': what a file or PEFT directory holds (example_ft.py runs either)."""
    path = Path(path)
    if path.is_dir():
        return "lora" if peft.read_config(path).get("peft_type") == "LORA" else "prompt"
    if path.is_file():
        state = load_file(path, mmap=True)
        return "lora" if isinstance(state, dict) and state.get("format") == PROJECT_FORMAT else "prompt"
    return "prompt"  # load_prompt names the missing path


def adapter_mismatch(config: dict, model: Transformer) -> Optional[str]:
    """A warning when an adapter trained over one quantization of the base is applied to another."""
    trained = config.get("base_quantization") or "none"
    here = model.quantization or "none"
    if trained == here:
        return None
    return (f"the adapter was trained on a base quantized as '{trained}' and is applied to one quantized as '{here}': "
            "outputs may differ from what training saw")


def apply_adapter(model: Transformer, path: Path) -> None:
    """Run a saved LoRA adapter (project or PEFT format) inside `model`, each rank its slices."""
    full, config = load_adapter(path, model.args)
    warning = adapter_mismatch(config, model)
    if warning and is_rank0():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    load_state(model, full, config["alpha"])


class MergedCheckpoint(Checkpoint):
    """A checkpoint read as base + scale * B @ A: `read` of an adapted weight returns merged slices.

    Merging needs no gathering: a column-parallel slice is W_local + s * B_local @ A, a
    row-parallel one W_local + s * B @ A_local, so every writer (Meta N shards, HF, GGUF)
    streams the merged model one tensor at a time. Shapes are checked when it is made.
    """

    def __init__(self, base: Checkpoint, path: Path):
        full, config = load_adapter(path, base.args)
        self.base, self.scale = base, config["alpha"] / config["rank"]
        self.format, self.path, self.args, self.tied = base.format, base.path, base.args, base.tied
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in sorted({key.rsplit(".lora.", 1)[0] for key in full}):
            key, A, B = module + ".weight", full.get(module + ".lora.A"), full.get(module + ".lora.B")
            if key not in base.keys or A is None or B is None:
                raise UserError(f"adapter {path} has weights for '{module}', which {base.path} does not have: the adapter is for another model")
            if key == "output.weight" and base.tied:
                raise UserError(f"adapter {path} adapts the output layer, but {base.path} ties it to the embedding: merge would change both")
            out_features, in_features = base.shape(key)
            if A.shape != (A.size(0), in_features) or B.shape != (out_features, A.size(0)):
                raise UserError(f"adapter {path} has A {tuple(A.shape)}, B {tuple(B.shape)} for '{key}' of shape "
                                f"{(out_features, in_features)} in {base.path}: the adapter's base model does not match")
            self.factors[key] = (A, B)

    def read(self, key: str, rank: int = 0, n_ranks: int = 1) -> torch.Tensor:
        weight = self.base.read(key, rank, n_ranks)
        if key not in self.factors:
            return weight
        (A, B), (a_dim, b_dim) = self.factors[key], lora_split_dims(key)
        return merged_weight(weight, local_slice(A, a_dim, rank, n_ranks), local_slice(B, b_dim, rank, n_ranks), self.scale)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def shape(self, key: str) -> torch.Size:
        return self.base.shape(key)

    def tokenizer_file(self) -> Optional[Path]:
        return self.base.tokenizer_file()

    def replicas(self, key: str) -> list[torch.Tensor]:
        return [] if key in self.factors else self.base.replicas(key)

    def meta_keys(self) -> list[str]:
        return self.base.meta_keys()

    def params_text(self) -> str:
        return self.base.params_text()

    def stated_context(self) -> Optional[int]:
        return self.base.stated_context()

    @property
    def n_files(self) -> Optional[int]:
        return self.base.n_files

    def check_consistent(self) -> None:
        self.base.check_consistent()
