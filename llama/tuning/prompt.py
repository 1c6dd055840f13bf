"""Soft prompts (Lester et al. 2021): a trained [n_virtual_tokens, dim] matrix placed before the tokens.

The frozen model sees `[prompt rows, token embeddings]` (see `Transformer.hidden_states(prefix=)`),
so the prompt lives in the same space as token embeddings. Under tensor parallelism every rank
holds the full prompt: `ParallelEmbedding` gathers the embedding dim, so initial values agree,
and the first column-parallel layer all-reduces the gradient flowing back, so updates agree.

Two file formats:
- the project's own `prompt.pt`: `{"prompt_embeddings": tensor, "config": {...}}`;
- Hugging Face PEFT's prompt-tuning adapter: a directory with `adapter_config.json`
  (`peft_type: PROMPT_TUNING`) and `adapter_model.bin` holding `{"prompt_embeddings": tensor}`,
  so a prompt trained here loads into a PEFT stack over the same base model, and back.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llama.errors import UserError
from llama.files import atomic_torch_save, atomic_write_text, load_file, read_json, read_safetensors
from llama.formats.peft import CONFIG as PEFT_CONFIG
from llama.formats.peft import WEIGHTS as PEFT_SAFETENSORS
from llama.model import Transformer
from llama.tokenizer import Tokenizer

INITS = ("text", "vocab", "random")
PROJECT_FORMAT = "llama-mp-soft-prompt"
PEFT_WEIGHTS = "adapter_model.bin"  # what our export writes; PEFT reads it, and its own safetensors file is read too
# Our init names <-> PEFT's PromptTuningInit values.
PEFT_INIT = {"text": "TEXT", "vocab": "RANDOM_DISCRETE", "random": "RANDOM"}


class SoftPrompt(nn.Module):
    """The trained prefix: float32 master weights [n_virtual_tokens, dim] whatever the model dtype."""

    def __init__(self, embeddings: torch.Tensor, config: Optional[dict] = None):
        super().__init__()
        self.weight = nn.Parameter(embeddings.detach().float().clone())
        self.config = dict(config or {})

    @property
    def n_virtual_tokens(self) -> int:
        return self.weight.size(0)

    @property
    def dim(self) -> int:
        return self.weight.size(1)

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prefix for a batch, [batch_size, n_virtual_tokens, dim] (a view, no copy)."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def init_prompt(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    n_virtual_tokens: int,
    init: str = "text",
    init_text: str = "",
    seed: int = 0,
) -> SoftPrompt:
    """A new prompt initialised from the model's own embeddings (identical on every TP rank).

    `text`: embeddings of `init_text`'s tokens, repeated or cut to length (PEFT's TEXT);
    `vocab`: embeddings of randomly drawn vocabulary tokens (PEFT's RANDOM_DISCRETE);
    `random`: Gaussian noise at the scale of the real embeddings, so the first layer sees
    inputs of the size it was trained on. Random draws use a CPU generator seeded alike on all ranks.
    """
    if n_virtual_tokens < 1:
        raise UserError(f"--n_virtual_tokens must be at least 1, got {n_virtual_tokens}")
    if init not in INITS:
        raise UserError(f"unknown prompt init '{init}': choose one of {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(seed)
    vocab, dim = model.args.vocab_size, model.args.dim
    device = model.tok_embeddings.weight.device
    if init == "text":
        ids = tokenizer.encode(init_text, bos=False, eos=False)
        if not ids:
            raise UserError("--init_text is empty: give a text describing the task, or use --init vocab")
        ids = (ids * (n_virtual_tokens // len(ids) + 1))[:n_virtual_tokens]
    else:
        ids = torch.randint(0, vocab, (n_virtual_tokens,), generator=gen).tolist()
    with torch.no_grad():
        embeddings = model.tok_embeddings(torch.tensor(ids, device=device)).float()
        if init == "random":
            noise = torch.randn(n_virtual_tokens, dim, generator=gen).to(device)
            embeddings = noise * embeddings.std()
    config = {"init": init, "init_text": init_text if init == "text" else None, "seed": seed, "dim": dim}
    return SoftPrompt(embeddings, config)


def save_prompt(prompt: SoftPrompt, path: str | Path, extra: Optional[dict] = None) -> Path:
    """Write the project's format (`prompt.pt`) atomically."""
    config = {**prompt.config, **(extra or {}), "n_virtual_tokens": prompt.n_virtual_tokens, "dim": prompt.dim}
    state = {"format": PROJECT_FORMAT, "prompt_embeddings": prompt.weight.detach().cpu().clone(), "config": config}
    return atomic_torch_save(state, Path(path))


def save_peft_prompt(prompt: SoftPrompt, out_dir: str | Path, *, base_model: str = "", tokenizer_path: str = "", n_layers: int = 0, n_heads: int = 0) -> Path:
    """Write a PEFT prompt-tuning adapter directory (adapter_config.json + adapter_model.bin).

    `inference_mode: true` tells PEFT to load the saved embeddings instead of re-initialising.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    init = prompt.config.get("init", "random")
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "revision": None,
        "auto_mapping": None,
        "num_virtual_tokens": prompt.n_virtual_tokens,
        "token_dim": prompt.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": n_heads,
        "num_layers": n_layers,
        "prompt_tuning_init": PEFT_INIT.get(init, "RANDOM"),
        "prompt_tuning_init_text": prompt.config.get("init_text") if init == "text" else None,
        "tokenizer_name_or_path": tokenizer_path if init == "text" else None,
        "tokenizer_kwargs": None,
    }
    atomic_torch_save({"prompt_embeddings": prompt.weight.detach().cpu().clone()}, out_dir / PEFT_WEIGHTS)
    atomic_write_text(json.dumps(config, indent=2) + "\n", out_dir / PEFT_CONFIG)
    return out_dir


def load_prompt(path: str | Path, dim: Optional[int] = None) -> SoftPrompt:
    """Read a prompt in either format: a `prompt.pt` file or a PEFT adapter directory.

    With `dim` (the model's), a prompt of another width is a UserError naming both.
    """
    path = Path(path)
    if path.is_dir():
        prompt = _load_peft(path)
    elif path.is_file():
        prompt = _load_project(path)
    else:
        raise UserError(f"adapter {path} not found: pass a prompt.pt file or a PEFT adapter directory (train one with ft_main.py)")
    if dim is not None:
        check_dim(prompt, dim, path)
    return prompt


def check_dim(prompt: SoftPrompt, dim: int, path: str | Path) -> None:
    """A prompt only fits models of its own width."""
    if prompt.dim != dim:
        raise UserError(f"adapter {path} has embedding dim {prompt.dim} but the model has dim {dim}: use an adapter trained for this model")


def _load_project(path: Path) -> SoftPrompt:
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != PROJECT_FORMAT:
        raise UserError(f"{path} is not a prompt file written by ft_main.py (expected format '{PROJECT_FORMAT}')")
    return SoftPrompt(_check_matrix(state["prompt_embeddings"], path), state.get("config", {}))


def _load_peft(path: Path) -> SoftPrompt:
    config = read_json(path / PEFT_CONFIG, "not a PEFT adapter directory")
    if config.get("peft_type") != "PROMPT_TUNING":
        raise UserError(f"{path} is a {config.get('peft_type')} adapter; only PEFT PROMPT_TUNING adapters are soft prompts")
    if (path / PEFT_WEIGHTS).is_file():
        weights = load_file(path / PEFT_WEIGHTS)
    elif (path / PEFT_SAFETENSORS).is_file():
        weights = read_safetensors(path / PEFT_SAFETENSORS)
    else:
        raise UserError(f"{path} has neither {PEFT_WEIGHTS} nor {PEFT_SAFETENSORS}")
    if "prompt_embeddings" not in weights:
        raise UserError(f"{path} holds {sorted(weights)[:3]}, not 'prompt_embeddings'")
    embeddings = _check_matrix(weights["prompt_embeddings"], path)
    expected = config.get("num_virtual_tokens", 0) * (config.get("num_transformer_submodules") or 1)
    if embeddings.size(0) != expected or embeddings.size(1) != config.get("token_dim", embeddings.size(1)):
        raise UserError(f"{path}: prompt_embeddings {tuple(embeddings.shape)} disagree with num_virtual_tokens/token_dim in {PEFT_CONFIG}")
    inits = {v: k for k, v in PEFT_INIT.items()}
    ours = {"init": inits.get(config.get("prompt_tuning_init"), "random"), "init_text": config.get("prompt_tuning_init_text"), "peft_config": config}
    return SoftPrompt(embeddings, ours)


def _check_matrix(tensor, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        raise UserError(f"{path}: prompt embeddings must be a 2-d float tensor [n_virtual_tokens, dim]")
    return tensor
