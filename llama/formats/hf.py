"""Hugging Face Llama folders: read them as Meta-named weights, and write them.

A folder holds `config.json` and the weights in safetensors, one `model.safetensors` or several
files listed by `model.safetensors.index.json`. Two things differ from Meta's layout besides
the names (`HF_NAMES`):
- HF stores the rows of wq and wk in "rotate-half" order: within each head, the first halves of
  Meta's (x[2i], x[2i+1]) pairs come first, then the second halves (`to_hf_rows`/`from_hf_rows`,
  the permutation of transformers' `convert_llama_weights_to_hf.py`, with kv heads for wk).
- the SwiGLU width is stated (`intermediate_size`) instead of Meta's rounding rule.

The reader memory-maps each file and cuts each rank's slice with safetensors' `get_slice`, so a
rank reads only its own rows or columns. A q/k slice holds whole heads, and the permutation stays
within a head, so slicing first and un-permuting the slice gives the right rows.
"""

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from llama.config import parse_dtype
from llama.errors import UserError
from llama.files import STAGING, Staging, check_files, parse_size, read_json
from llama.formats.checkpoint import Checkpoint, verify
from llama.formats.hf_tokenizer import tokenizer_files
from llama.formats.layout import EMBEDDING, LLAMA3_MIN_VOCAB, NOT_LOADED, OUTPUT, check_names, full_shapes, rope_freqs
from llama.formats.params import model_args
from llama.model import META_ROPE_SCALING, ModelArgs
from llama.tokenizer import load_tokenizer

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
# Meta name (without "layers.N.") -> HF name (without "model.layers.N.").
HF_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer older transformers saved; recomputed
# Meta's SwiGLU rounding of released models, tried first so converted params.json files read naturally.
_FFN_RULES = [(m, None) for m in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1)] + [
    (m, f) for f in (1.3, 1.5, 1.2, 1.0, 1.4) for m in (1024, 4096, 256)]


def hf_name(key: str) -> str:
    """HF's name of a Meta weight name."""
    if key in HF_TOP:
        return HF_TOP[key]
    match = _META_LAYER.match(key)
    if not match or match.group(2) not in HF_NAMES:
        raise UserError(f"'{key}' has no Hugging Face name")
    return f"model.layers.{match.group(1)}.{HF_NAMES[match.group(2)]}"


_META_OF_HF = {v: k for k, v in HF_NAMES.items()}
_META_TOP = {v: k for k, v in HF_TOP.items()}


def meta_name(name: str) -> Optional[str]:
    """Meta's name of an HF weight name, None if it is not a Llama weight."""
    if name in _META_TOP:
        return _META_TOP[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _META_OF_HF:
        return f"layers.{match.group(1)}.{_META_OF_HF[match.group(2)]}"
    return None


def qk_heads(key: str, args: ModelArgs) -> Optional[int]:
    """Heads whose rows HF permutes in `key` (n_heads for wq, kv heads for wk), None for other weights."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved (x0, x1), (x2, x3).. rows of each head -> HF's rotate-half order (x0, x2, .., x1, x3, ..).
    Works on any [heads * head_dim, ...] tensor (weights, LoRA B matrices)."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `to_hf_rows`."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's rule give `hidden` (HF's intermediate_size)."""
    for multiple_of, multiplier in _FFN_RULES:
        if ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    # Rounding up to a multiple of `hidden` itself lands on it from anything in (0, hidden].
    base = int(2 * 4 * dim / 3)
    return {"multiple_of": hidden, "ffn_dim_multiplier": hidden / base if base > hidden else None}


def rope_settings(config: dict, path: Path) -> dict:
    """rope_theta and Llama 3 scaling from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", scaling.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise UserError(f"{path}: RoPE scaling of type '{kind}' is not supported (only Llama 3's 'llama3')")
    return {"rope_theta": theta, "use_scaled_rope": True, "rope_scaling": {k: scaling[k] for k in META_ROPE_SCALING if k in scaling}}


def params_from_config(config: dict, path: Path) -> dict:
    """Meta params.json keys of an HF Llama config; other architectures or options are a UserError."""
    arch = config.get("architectures") or []
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in arch:
        raise UserError(f"{path} describes {', '.join(arch) or config.get('model_type', 'an unknown model')}, "
                        "not LlamaForCausalLM: only Llama checkpoints are supported")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{path} sets {flag}: Llama as this project implements it has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path} uses hidden_act {config['hidden_act']}; Llama uses silu")
    try:
        dim, heads = config["hidden_size"], config["num_attention_heads"]
        params = {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            "vocab_size": config["vocab_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            **ffn_params(dim, config["intermediate_size"]),
            **rope_settings(config, path),
        }
    except KeyError as err:
        raise UserError(f"{path} lacks {err}: not a complete Llama config") from None
    if config.get("head_dim", dim // heads) != dim // heads:
        raise UserError(f"{path}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads ({dim // heads})")
    return params


def weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (from the index, or the one file)."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX, "the index of a sharded Hugging Face folder")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{path / INDEX} has no weight_map")
        files = {name: path / file for name, file in weight_map.items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise UserError(f"{path / INDEX} names {missing[:3]}, missing from {path}: an incomplete download?")
        return files
    if (path / SINGLE).is_file():
        return {name: path / SINGLE for name in _open(path / SINGLE).keys()}
    if (path / STAGING).is_dir():
        raise UserError(f"{path} holds only the partial output of an interrupted conversion ({STAGING}): "
                        "rerun the split_model.py command that writes it")
    other = sorted(p.name for p in path.glob("*.bin"))
    hint = f" ({other[0]} is a pickle: only safetensors are read)" if other else ""
    raise UserError(f"{path} has config.json but no {SINGLE} or {INDEX}{hint}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for foreign or truncated files
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0][:200]}") from None


class HFCheckpoint(Checkpoint):
    """A Hugging Face Llama folder, read through safetensors' memory-mapped slices."""

    format = "hf"

    def __init__(self, path: Path, vocab_size: Optional[int] = None, verify: bool = False, **overrides):
        self.path = Path(path)
        check_files(self.path, hashes=verify)
        self.config = read_json(self.path / CONFIG, "a Hugging Face folder needs config.json")
        self.args = model_args(params_from_config(self.config, self.path / CONFIG), vocab_size, CONFIG, **overrides)
        self.args.vocab_parallel_embedding = self.args.vocab_size >= LLAMA3_MIN_VOCAB  # as Meta's Llama 3 code
        files = weight_files(self.path)
        self.paths = sorted(set(files.values()))
        handles = {p: _open(p) for p in self.paths}
        self.names: dict[str, tuple[object, str]] = {}  # Meta name -> (file handle, HF name)
        for name, file in files.items():
            key = meta_name(name)
            if key is None:
                if _HF_IGNORED.search(name):
                    continue
                raise UserError(f"{file} holds '{name}', not a Llama weight: wrong model?")
            self.names[key] = (handles[file], name)
        self.tied = OUTPUT not in self.names
        if self.tied and self.config.get("tie_word_embeddings") is False:
            raise UserError(f"{self.path} lacks lm_head.weight but config.json says tie_word_embeddings false: a truncated download?")
        check_names(set(self.names), self.args, str(self.path), describe="config.json")
        for key, shape in full_shapes(self.args).items():
            if key in self.names and tuple(self.shape(key)) != shape:
                raise UserError(f"'{hf_name(key)}' is {tuple(self.shape(key))} but config.json implies {shape}")

    def stated_context(self) -> Optional[int]:
        stated = self.config.get("max_position_embeddings")
        return int(stated) if stated else None

    def _slice(self, key: str):
        handle, name = self.names[EMBEDDING if key == OUTPUT and self.tied else key]
        return handle.get_slice(name)

    def shape(self, key: str) -> torch.Size:
        if key in NOT_LOADED:
            return torch.Size([self.args.head_dim // 2])
        return torch.Size(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if key in NOT_LOADED:
            key = EMBEDDING
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[self._slice(key).get_dtype()]

    def read(self, key: str, rank: int = 0, n_ranks: int = 1) -> torch.Tensor:
        if key in NOT_LOADED:  # Meta's rope.freqs, for a Meta output
            return rope_freqs(self.args, self.dtype(EMBEDDING))
        part = self._slice(key)
        dim = self.split_dim(key)
        if dim is None or n_ranks == 1:
            tensor = part[:]
        else:
            size = part.get_shape()[dim]
            if size % n_ranks:
                raise UserError(f"'{key}' has size {size} on dim {dim}, which does not split into {n_ranks} parts")
            start, stop = rank * size // n_ranks, (rank + 1) * size // n_ranks
            tensor = part[start:stop] if dim == 0 else part[:, start:stop]
        heads = qk_heads(key, self.args)
        return tensor if heads is None else from_hf_rows(tensor, heads // n_ranks)


def context_length(ckpt: Checkpoint) -> int:
    """The context a converted model states (HF's max_position_embeddings, GGUF's context_length):
    an HF input's own figure, else 131072 for Llama 3.1+ scaled RoPE, else the args' max_seq_len."""
    stated = ckpt.stated_context()
    if stated:
        return stated
    return 131072 if ckpt.args.use_scaled_rope else ckpt.args.max_seq_len


def config_from_args(args: ModelArgs, *, tied: bool, dtype: torch.dtype, bos_id: Optional[int], eos_id: Optional[int],
                     context: int) -> dict:
    """config.json for transformers' LlamaForCausalLM (the transformers 4 spelling, which 5 reads too)."""
    scaling = None
    if args.use_scaled_rope:
        scaling = {"rope_type": "llama3", **(args.rope_scaling or META_ROPE_SCALING)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": tied,
        "vocab_size": args.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_keys(ckpt: Checkpoint) -> list[str]:
    """The Meta names an HF folder of this model stores (no lm_head when tied)."""
    return [k for k in ckpt.keys if not (k == OUTPUT and ckpt.tied)]


def group_files(ckpt: Checkpoint, dtype: Optional[torch.dtype], max_bytes: int) -> list[list[str]]:
    """Keys per safetensors file, in order, each file at most max_bytes (or one tensor)."""
    groups, size = [[]], 0
    for key in hf_keys(ckpt):
        nbytes = ckpt.shape(key).numel() * (dtype or ckpt.dtype(key)).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def hf_tensor(ckpt: Checkpoint, key: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A weight in HF's row order as a tensor of its own: safetensors refuses tensors that share
    storage, so a view into a bigger (mapped) storage is copied; a whole one is written as it is."""
    tensor = ckpt.read(key)
    heads = qk_heads(key, ckpt.args)
    if heads is not None:
        tensor = to_hf_rows(tensor, heads)
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes
    return tensor.to(dtype or tensor.dtype, memory_format=torch.contiguous_format, copy=not whole)


def tokenizer_ids(ckpt: Checkpoint) -> tuple[Optional[int], Optional[int | list[int]]]:
    """BOS and EOS (the stop ids, when several) of the tokenizer shipped with the weights."""
    path = ckpt.tokenizer_file()
    if path is None:
        return None, None
    tok = load_tokenizer(path)
    stops = sorted(tok.stop_ids)
    return tok.bos_id, stops[0] if len(stops) == 1 else stops


def hf_tokenizer_files(ckpt: Checkpoint) -> dict[str, str]:
    """tokenizer.json & co. for the tokenizer shipped with the weights (llama/formats/hf_tokenizer.py), if any."""
    path = ckpt.tokenizer_file()
    if path is None:
        return {}
    files = tokenizer_files(path, context_length(ckpt))
    if files is None:
        print("note: tokenizer.json not written (AutoTokenizer needs it): pip install -e \".[hf]\" for HF's tokenizers library",
              file=sys.stderr)
    return files or {}


class HFWriter:
    """--out_format hf: config.json, generation_config.json, safetensors (+ index when split), and
    the tokenizer as HF's tokenizer.json, tokenizer_config.json and special_tokens_map.json."""

    @staticmethod
    def prepare(ckpt: Checkpoint, dtype, max_shard_size: str = "5GB") -> dict:
        return {"dtype": parse_dtype(dtype) if isinstance(dtype, str) else dtype, "max_bytes": parse_size(max_shard_size)}

    @staticmethod
    def needed_bytes(ckpt: Checkpoint, num_shards: int, prepared: dict) -> int:
        return sum(ckpt.shape(k).numel() * (prepared["dtype"] or ckpt.dtype(k)).itemsize for k in hf_keys(ckpt)) + 2**25  # + tokenizer.json (Llama 3: 17 MB)

    @staticmethod
    def write(ckpt: Checkpoint, staging: Staging, *, num_shards: int, prepared: dict, progress: bool) -> list[dict]:
        dtype = prepared["dtype"]
        groups = group_files(ckpt, dtype, prepared["max_bytes"])
        names = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

        def file_writer(keys: list[str]):
            def write(path: Path) -> None:
                bar = tqdm(keys, desc=path.name, unit="tensor", disable=not progress, leave=False)
                save_file({hf_name(k): hf_tensor(ckpt, k, dtype) for k in bar}, str(path), metadata={"format": "pt"})
                os.chmod(path, 0o644)  # safetensors creates files readable by the owner only
            return write

        files = staging.write_files(list(zip(names, map(file_writer, groups))))
        bos, eos = tokenizer_ids(ckpt)
        out_dtype = dtype or ckpt.dtype(EMBEDDING)
        texts = {CONFIG: config_from_args(ckpt.args, tied=ckpt.tied, dtype=out_dtype, bos_id=bos, eos_id=eos, context=context_length(ckpt)),
                 GENERATION_CONFIG: {"bos_token_id": bos, "eos_token_id": eos}}
        if len(groups) > 1:
            total = sum(ckpt.shape(k).numel() * (dtype or ckpt.dtype(k)).itemsize for k in hf_keys(ckpt))
            texts[INDEX] = {"metadata": {"total_size": total},
                            "weight_map": {hf_name(k): name for name, keys in zip(names, groups) for k in keys}}
        texts.update(hf_tokenizer_files(ckpt))
        return files + [staging.write_text(name, content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
                        for name, content in texts.items()]

    @staticmethod
    def verify(ckpt: Checkpoint, staging: Staging, prepared: dict, progress: bool) -> None:
        verify(ckpt, HFCheckpoint(staging.tmp), prepared["dtype"], progress)

    @staticmethod
    def describe(ckpt: Checkpoint, prepared: dict) -> str:
        return str(prepared["dtype"] or ckpt.dtype(EMBEDDING)).removeprefix("torch.")
