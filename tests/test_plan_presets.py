"""The planner's presets (`split_model.py --plan --model NAME`) against the published Hugging Face configs.

The figures below are copied from each model's config.json on the Hub (hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size,
rope_theta) and the parameter counts from the model cards / safetensors metadata (total_size / 2
for the bfloat16 files, lm_head included): the presets derive the SwiGLU width from Meta's
params.json rule, so a wrong multiple_of or ffn_dim_multiplier shows up here.
"""

import pytest
from dist_utils import in_process

from llama.formats import plan
from llama.formats.presets import PRESETS, preset

HF_CONFIGS = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, rope_theta, parameters)
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0, 6_738_415_616),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000, 10000.0, 13_015_864_320),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000, 10000.0, 68_976_648_192),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, 8_030_261_248),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0, 70_553_706_496),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, 8_030_261_248),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0, 70_553_706_496),
    "llama-3.1-405b": (16384, 53248, 126, 128, 8, 128256, 500000.0, 405_853_388_800),
    "llama-3.3-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0, 70_553_706_496),
}
TIED = {  # Llama 3.2 1B/3B tie the output to the embedding: the Hub counts it once, the loader holds both
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0, 1_235_814_400),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, 500000.0, 3_212_749_824),
}


@pytest.mark.parametrize("name", [*HF_CONFIGS, *TIED])
def test_preset_shapes_are_the_published_ones(name: str):
    hidden, intermediate, layers, heads, kv, vocab, theta, parameters = {**HF_CONFIGS, **TIED}[name]
    args = preset(name)
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size, args.rope_theta) == \
        (hidden, intermediate, layers, heads, kv, vocab, theta)
    tied_output = vocab * hidden if name in TIED else 0
    assert plan.parameter_count(args) == parameters + tied_output
    assert args.use_scaled_rope == (name.startswith(("llama-3.1", "llama-3.2", "llama-3.3")))


def test_every_preset_is_checked():
    assert set(PRESETS) == set(HF_CONFIGS) | set(TIED)


@pytest.mark.slow
def test_plan_a_released_model_before_any_download():
    result = in_process("split_model.py", "--plan", "--model", "llama-3-70b", "--gpu_mem", "24GiB", "--batch_size", "1", "--seq_len", "2048",
                    "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "70.55 B parameters" in result.stdout and "smallest N that fits 24.0 GiB cards: 8" in result.stdout
    unknown = in_process("split_model.py", "--plan", "--model", "llama-9")
    assert unknown.returncode == 2 and "unknown --model 'llama-9'" in unknown.stderr
