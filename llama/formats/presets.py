"""The shapes of Meta's released Llama models, so the memory planner answers before any download.

Each entry is the model's params.json as Meta publishes it (llama-models' `sku_list` / the release
folders), with the vocabulary filled in (Meta's Llama 2 files say -1: the tokenizer's 32000).
`split_model.py --plan --model NAME` plans for one of them; tests/test_plan_presets.py checks every
shape against the published Hugging Face configs (hidden, intermediate and vocabulary sizes).
"""

from llama.errors import UserError
from llama.formats.params import model_args
from llama.model import ModelArgs

LLAMA2 = {"multiple_of": 256, "norm_eps": 1e-5, "vocab_size": 32000}
LLAMA3 = {"norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256}
LLAMA31 = {**LLAMA3, "use_scaled_rope": True}

PRESETS: dict[str, dict] = {
    "llama-2-7b": {**LLAMA2, "dim": 4096, "n_layers": 32, "n_heads": 32},
    "llama-2-13b": {**LLAMA2, "dim": 5120, "n_layers": 40, "n_heads": 40},
    "llama-2-70b": {**LLAMA2, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096},
    "llama-3-8b": {**LLAMA3, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024},
    "llama-3-70b": {**LLAMA3, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096},
    "llama-3.1-8b": {**LLAMA31, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024},
    "llama-3.1-70b": {**LLAMA31, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096},
    "llama-3.1-405b": {**LLAMA31, "dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "ffn_dim_multiplier": 1.2,
                       "multiple_of": 4096},
    "llama-3.2-1b": {**LLAMA31, "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5, "multiple_of": 256},
    "llama-3.2-3b": {**LLAMA31, "dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0, "multiple_of": 256},
    "llama-3.3-70b": {**LLAMA31, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096},
}
ALIASES = {"llama-3-405b": "llama-3.1-405b"}


def preset(name: str) -> ModelArgs:
    """The ModelArgs of a released model, by name (case-insensitive)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise UserError(f"unknown --model '{name}': choose one of {', '.join(PRESETS)} (or plan a folder with --ckpt_dir / --params)")
    return model_args(PRESETS[key], source=f"the {key} preset")
