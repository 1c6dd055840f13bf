"""--out_format gguf: one `model.gguf` that llama.cpp loads, written with the `gguf` package it publishes.

What goes in follows llama.cpp's own `convert_hf_to_gguf.py` for `LlamaForCausalLM`:
- metadata `llama.*` (context, widths, heads, RoPE base and dimension, RMSNorm epsilon, vocab
  size) and `general.file_type`;
- the weights under llama.cpp's names (`gguf`'s own tensor map knows Meta's names), in Meta's
  row order: llama.cpp rotates interleaved pairs (x[2i], x[2i+1]) as Meta does, which is why its
  converter permutes HF's q/k rows *back* to Meta's order (`LlamaModel.permute`, the inverse of
  `to_hf_rows`). Our readers hand out Meta-layout tensors, so they go in as they are;
- Llama 3.1+ RoPE scaling as a `rope_freqs.weight` tensor of per-frequency divisors;
- the vocabulary: SentencePiece (Llama 1/2) as `_create_vocab_sentencepiece` writes it (tokens,
  scores, types); Meta's Llama 3 tiktoken file as the converter writes the Hub's tokenizer.json made
  from it (model gpt2, pre-tokenizer llama-bpe, byte-level tokens, merges rebuilt from the ranks);
  and the family's chat template (llama/chat.py) as `tokenizer.chat_template`.
Norms and other 1-D tensors stay float32 (llama.cpp's kernels expect that); q8_0 quantizes each
2-D weight whose rows split into 32-value blocks, and writes the others as float16, as llama.cpp
does when a tensor cannot be quantized.

The file is streamed: the header and tensor table are planned from shapes, then each tensor is
read, converted and written on its own, so memory stays near the largest tensor.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from llama.chat import CHAT_TEMPLATES
from llama.errors import UserError
from llama.formats.checkpoint import Checkpoint
from llama.formats.hf import context_length
from llama.formats.hf_tokenizer import byte_level_merges, byte_level_ranks
from llama.formats.layout import OUTPUT
from llama.model import META_ROPE_SCALING, scale_rope_freqs
from llama.tokenizer import load_tokenizer

GGUF_FILE = "model.gguf"
GGUF_DTYPES = ("float32", "float16", "q8_0")
ROPE_FREQS = "rope_freqs.weight"


def import_gguf():
    """The optional `gguf` package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError("--out_format gguf needs the optional 'gguf' package (llama.cpp's): pip install -e .[gguf]") from None
    return gguf


def parse_gguf_dtype(dtype) -> str:
    """float32 (default), float16 or q8_0; a torch dtype is taken by its name."""
    name = "float32" if dtype in (None, "keep") else str(dtype).removeprefix("torch.")
    if name not in GGUF_DTYPES:
        raise UserError(f"--dtype {name} is not a GGUF type this exporter writes: choose one of {', '.join(GGUF_DTYPES)}")
    return name


def file_type(gguf, dtype: str):
    return {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def tensor_type(gguf, name: str, shape: tuple[int, ...], dtype: str):
    """The GGML type llama.cpp's converter gives this tensor under --outtype `dtype`."""
    qtypes = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return qtypes.F32
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[qtypes.Q8_0][0]
        return qtypes.Q8_0 if shape[-1] % block == 0 else qtypes.F16
    return qtypes.F16 if dtype == "float16" else qtypes.F32


def gguf_names(gguf, ckpt: Checkpoint) -> dict[str, str]:
    """Meta name -> llama.cpp name of every weight written (no output when tied: llama.cpp reuses token_embd)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, ckpt.args.n_layers)
    names = {}
    for key in ckpt.keys:
        if key == OUTPUT and ckpt.tied:
            continue
        names[key] = name_map.get_name(key, try_suffixes=(".weight",))
        if names[key] is None:
            raise UserError(f"'{key}' has no llama.cpp name")
    return names


def rope_factors(args) -> torch.Tensor:
    """Llama 3.1+ scaling as llama.cpp takes it: per-frequency divisors (1 for short wavelengths,
    `factor` for long ones, smooth between), computed in float64 like the converter's Python floats."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
    freqs = 1.0 / args.rope_theta**exponents
    scaled = scale_rope_freqs(freqs, **(args.rope_scaling or META_ROPE_SCALING))
    return (freqs / scaled).to(torch.float32)


def sentencepiece_vocab(gguf, tok, vocab_size: int) -> dict:
    """tokenizer.ggml.* of a SentencePiece model, as llama.cpp's `_create_vocab_sentencepiece`:
    every piece with its score and type; ids the tokenizer lacks padded as unused [PADi]."""
    sp, types = tok.sp, gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    kinds = [types.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        if sp.is_unknown(i):
            kinds[i] = types.UNKNOWN
        elif sp.is_control(i):
            kinds[i] = types.CONTROL
        elif sp.is_unused(i):
            kinds[i] = types.UNUSED
        elif sp.is_byte(i):
            kinds[i] = types.BYTE
        else:
            kinds[i] = types.NORMAL
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": sp.unk_id(), "pad": tok.pad_id}
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": [int(k) for k in kinds],
            "ids": {k: v for k, v in ids.items() if v >= 0}, "add_bos": True, "add_eos": False}


def tiktoken_vocab(gguf, tok, path: Path, vocab_size: int) -> dict:
    """tokenizer.ggml.* of Meta's Llama 3 tiktoken file as llama.cpp's converter writes it from the Hub's
    tokenizer.json: model gpt2, pre-tokenizer "llama-bpe" (Meta's split pattern), the BPE tokens in
    GPT-2's byte-to-unicode form, the merges, and the 256 special tokens as control tokens."""
    ranks, as_text = byte_level_ranks(path)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    kinds = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, rank in ranks.items():
        tokens[rank], kinds[rank] = as_text(token), int(gguf.TokenType.NORMAL)
    for text, token_id in tok.special_tokens.items():
        tokens[token_id], kinds[token_id] = text, int(gguf.TokenType.CONTROL)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": kinds, "merges": byte_level_merges(ranks, as_text),
            "ids": {"bos": tok.bos_id, "eos": tok.eos_id}, "add_bos": True, "add_eos": False}


def vocabulary(gguf, ckpt: Checkpoint) -> dict:
    """The model's vocabulary in llama.cpp's terms (SentencePiece or Llama 3 tiktoken)."""
    path = ckpt.tokenizer_file()
    if path is None:
        raise UserError(f"no tokenizer.model in {ckpt.path} (or its original/): a GGUF file carries the vocabulary, "
                        "so put the model's tokenizer.model there")
    tok = load_tokenizer(path)
    if tok.n_words > ckpt.args.vocab_size:
        raise UserError(f"{path} has {tok.n_words} tokens but the model's vocab_size is {ckpt.args.vocab_size}: "
                        "use the tokenizer.model that came with this checkpoint")
    vocab = tiktoken_vocab(gguf, tok, path, ckpt.args.vocab_size) if tok.family == "llama3" else sentencepiece_vocab(gguf, tok, ckpt.args.vocab_size)
    return {**vocab, "chat_template": CHAT_TEMPLATES[tok.family]}  # the family's chat format, as llama.cpp reads it


def add_metadata(writer, gguf, ckpt: Checkpoint, *, dtype: str, vocab: dict) -> None:
    args = ckpt.args
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(ckpt.path.resolve().name)
    writer.add_context_length(context_length(ckpt))
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(file_type(gguf, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["ids"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    writer.add_chat_template(vocab["chat_template"])


def plan_tensors(gguf, ckpt: Checkpoint, dtype: str) -> list[tuple[Optional[str], str, tuple[int, ...], object]]:
    """(Meta name or None for rope_freqs, GGUF name, shape, GGML type) of every tensor, in file order."""
    plan = []
    if ckpt.args.use_scaled_rope:
        plan.append((None, ROPE_FREQS, (ckpt.args.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    for key, name in gguf_names(gguf, ckpt).items():
        shape = tuple(ckpt.shape(key))
        plan.append((key, name, shape, tensor_type(gguf, name, shape, dtype)))
    return plan


def tensor_bytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def gguf_data(gguf, ckpt: Checkpoint, key: Optional[str], qtype) -> np.ndarray:
    """A tensor as it is stored in the file: float32 first (bf16 has no numpy type; f16 -> f32 is exact),
    then converted by the package's own quantizer (bit-exact with ggml's)."""
    source = rope_factors(ckpt.args) if key is None else ckpt.read(key)
    return gguf.quants.quantize(source.to(torch.float32).numpy(), qtype)


def write_gguf(ckpt: Checkpoint, path: Path, prepared: dict, progress: bool) -> None:
    gguf = prepared["gguf"]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_metadata(writer, gguf, ckpt, dtype=prepared["dtype"], vocab=prepared["vocab"])
        for _, name, shape, qtype in prepared["tensors"]:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor_bytes(gguf, shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, name, _, qtype in tqdm(prepared["tensors"], desc=path.name, unit="tensor", disable=not progress, leave=False):
            writer.write_tensor_data(gguf_data(gguf, ckpt, key, qtype))
    finally:
        writer.close()
    path.chmod(0o644)


def field_value(gguf, field):
    """A metadata value read back with GGUFReader (scalars, strings, arrays; works on old gguf releases too)."""
    kinds = gguf.GGUFValueType
    parts = [field.parts[i] for i in field.data]
    if field.types[0] == kinds.STRING:
        return bytes(parts[0]).decode()
    if field.types[0] == kinds.ARRAY:
        if field.types[-1] == kinds.STRING:
            return [bytes(p).decode() for p in parts]
        return [p.tolist()[0] for p in parts]
    return parts[0].tolist()[0]


def expected_metadata(gguf, ckpt: Checkpoint, prepared: dict) -> dict:
    """Key -> value the file must hold (float values as float32 stores them)."""
    args, vocab, f32 = ckpt.args, prepared["vocab"], lambda x: float(np.float32(x))
    llm, tok, arch = gguf.Keys.LLM, gguf.Keys.Tokenizer, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    expected = {
        gguf.Keys.General.ARCHITECTURE: arch,
        llm.CONTEXT_LENGTH: context_length(ckpt),
        llm.EMBEDDING_LENGTH: args.dim,
        llm.BLOCK_COUNT: args.n_layers,
        llm.FEED_FORWARD_LENGTH: args.hidden_dim,
        gguf.Keys.Attention.HEAD_COUNT: args.n_heads,
        gguf.Keys.Attention.HEAD_COUNT_KV: args.kv_heads,
        gguf.Keys.Rope.DIMENSION_COUNT: args.head_dim,
        gguf.Keys.Rope.FREQ_BASE: f32(args.rope_theta),
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: f32(args.norm_eps),
        llm.VOCAB_SIZE: args.vocab_size,
        gguf.Keys.General.FILE_TYPE: int(file_type(gguf, prepared["dtype"])),
        tok.MODEL: vocab["model"],
        tok.PRE: vocab["pre"],
        tok.LIST: vocab["tokens"],
        tok.TOKEN_TYPE: vocab["types"],
        tok.ADD_BOS: vocab["add_bos"],
        tok.ADD_EOS: vocab["add_eos"],
        tok.CHAT_TEMPLATE: vocab["chat_template"],
    }
    if "scores" in vocab:
        expected[tok.SCORES] = [f32(s) for s in vocab["scores"]]
    if "merges" in vocab:
        expected[tok.MERGES] = vocab["merges"]
    id_keys = {"bos": tok.BOS_ID, "eos": tok.EOS_ID, "unk": tok.UNK_ID, "pad": tok.PAD_ID}
    expected.update({id_keys[kind]: token_id for kind, token_id in vocab["ids"].items()})
    return {key.format(arch=arch): value for key, value in expected.items()}


def verify_gguf(ckpt: Checkpoint, path: Path, prepared: dict, progress: bool) -> None:
    """Re-read the file: every metadata value above, the tensor names, shapes and types, and each
    tensor's bytes equal to the source converted again (a disk or memory fault shows as a difference)."""
    gguf = prepared["gguf"]
    reader = gguf.GGUFReader(str(path))
    for key, value in expected_metadata(gguf, ckpt, prepared).items():
        field = reader.get_field(key)
        if field is None or field_value(gguf, field) != value:
            raise UserError(f"verification failed: {path.name} metadata '{key}' is not what was written")
    stored = {t.name: t for t in reader.tensors}
    if list(stored) != [name for _, name, _, _ in prepared["tensors"]]:
        raise UserError(f"verification failed: {path.name} does not hold the tensors written")
    for key, name, shape, qtype in tqdm(prepared["tensors"], desc="verify", unit="tensor", disable=not progress, leave=False):
        got = stored[name]
        if got.tensor_type != qtype or tuple(int(n) for n in reversed(got.shape)) != shape:
            raise UserError(f"verification failed: '{name}' in {path.name} has the wrong type or shape")
        if got.data.tobytes() != gguf_data(gguf, ckpt, key, qtype).tobytes():
            raise UserError(f"verification failed: '{name}' in {path.name} differs from the input (disk or memory fault?)")


class GGUFWriter:
    """--out_format gguf: model.gguf (llama.cpp), --dtype float32 (default), float16 or q8_0."""

    @staticmethod
    def prepare(ckpt: Checkpoint, dtype, **options) -> dict:
        if options:
            raise UserError(f"options {sorted(options)} do not apply to --out_format gguf")
        gguf = import_gguf()
        dtype = parse_gguf_dtype(dtype)
        vocab = vocabulary(gguf, ckpt)
        return {"gguf": gguf, "dtype": dtype, "vocab": vocab, "tensors": plan_tensors(gguf, ckpt, dtype)}

    @staticmethod
    def needed_bytes(ckpt: Checkpoint, num_shards: int, prepared: dict) -> int:
        gguf = prepared["gguf"]
        vocab = prepared["vocab"]
        vocab_bytes = sum(len(t.encode()) + 16 for t in vocab["tokens"] + vocab.get("merges", []))
        return sum(tensor_bytes(gguf, shape, qtype) + 64 for _, _, shape, qtype in prepared["tensors"]) + vocab_bytes + 2**20

    @staticmethod
    def write(ckpt: Checkpoint, staging, *, num_shards: int, prepared: dict, progress: bool) -> list[dict]:
        return staging.write_files([(GGUF_FILE, lambda path: write_gguf(ckpt, path, prepared, progress))])

    @staticmethod
    def verify(ckpt: Checkpoint, staging, prepared: dict, progress: bool) -> None:
        verify_gguf(ckpt, staging.path(GGUF_FILE), prepared, progress)

    @staticmethod
    def describe(ckpt: Checkpoint, prepared: dict) -> str:
        return prepared["dtype"]
