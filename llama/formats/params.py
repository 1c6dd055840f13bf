"""Meta's params.json: the model's shape as Meta's releases state it, read into `ModelArgs` and written back.

Hugging Face configs are translated into these keys (llama/formats/hf.py) and then read by the
same `model_args`, so every format gets the same checks.
"""

import json
import sys
from pathlib import Path
from typing import Mapping, Optional

from llama.errors import UserError, is_rank0
from llama.files import read_json
from llama.model import META_ROPE_SCALING, ModelArgs

PARAMS = "params.json"
# params.json keys of Llama 3.x releases that do not change a text model's forward pass.
IGNORED_PARAMS = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "vision_model",
                  "quantization_args", "moe_args"}


# Newer Meta params.json spellings of the RoPE scaling constants -> HF's names used in ModelArgs.rope_scaling.
META_ROPE_KEYS = {"rope_scaling_factor": "factor", "rope_high_freq_factor": "high_freq_factor"}


def read_params(path: Path) -> dict:
    """params.json as a dict; missing or malformed files are a UserError."""
    return read_json(path, f"a model directory needs {PARAMS} (Meta layout)")


def model_args(params: Mapping, vocab_size: Optional[int] = None, source: str = "params.json", **overrides) -> ModelArgs:
    """ModelArgs from params.json; `vocab_size: -1` is filled from the tokenizer, a mismatch is an error.

    Keys of Llama 3.x releases that do not change the text forward (vision, quantization) are
    dropped with a note on stderr; truly unknown keys are an error. `source` names the file the
    params came from in messages (config.json for a Hugging Face folder).
    """
    params = dict(params)
    ignored = sorted(set(params) & IGNORED_PARAMS)
    if ignored and is_rank0():
        print(f"note: params.json keys {ignored} do not change the text model's forward and are ignored", file=sys.stderr)
    for key in ignored:
        del params[key]
    for meta_key, name in META_ROPE_KEYS.items():
        if meta_key in params:
            value = params.pop(meta_key)
            if value is not None:
                params["rope_scaling"] = {**(params.get("rope_scaling") or META_ROPE_SCALING), name: value}
    if overrides.get("rope_scaling"):  # override single constants over the checkpoint's (or Meta's)
        overrides["rope_scaling"] = {**(params.get("rope_scaling") or META_ROPE_SCALING), **overrides["rope_scaling"]}
    known = set(ModelArgs.__dataclass_fields__) - {"vocab_parallel_embedding"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"params.json has unknown keys {unknown}; known keys are {sorted(known)}")
    args = ModelArgs(**{**params, **overrides})
    if args.rope_scaling is not None:
        missing = sorted(set(META_ROPE_SCALING) - set(args.rope_scaling))
        if missing:
            raise UserError(f"rope_scaling {args.rope_scaling} lacks {missing}: give all of {sorted(META_ROPE_SCALING)}")
        args.rope_scaling = {k: args.rope_scaling[k] for k in META_ROPE_SCALING}
    if vocab_size is not None:
        if args.vocab_size == -1:
            args.vocab_size = vocab_size
        elif args.vocab_size != vocab_size:
            raise UserError(
                f"tokenizer has {vocab_size} tokens but {source} says vocab_size {args.vocab_size}: "
                "use the tokenizer.model that came with this checkpoint"
            )
    if args.vocab_size <= 0:
        raise UserError(f"vocab_size is unknown: set it in {source} or pass the model's tokenizer")
    if args.dim % args.n_heads:
        raise UserError(f"dim {args.dim} is not divisible by n_heads {args.n_heads} in {source}")
    return args


def params_from_args(args: ModelArgs) -> dict:
    """Meta params.json of a model (written when converting to the Meta layout)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        params["use_scaled_rope"] = True
        if args.rope_scaling not in (None, META_ROPE_SCALING):
            params["rope_scaling"] = args.rope_scaling  # e.g. HF's factor 32 for Llama 3.2, kept
    return params


def params_json(args: ModelArgs) -> str:
    """params.json text of a model."""
    return json.dumps(params_from_args(args), indent=2) + "\n"
