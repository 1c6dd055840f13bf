"""GGUF export (--out_format gguf) read back with llama.cpp's own `gguf` package.

References: the stories260K Meta weights as torch loads them, its params.json and llama2.c's
description in golden.json (metadata), sentencepiece itself (vocabulary: the bundled 512-piece
model and Meta's 32000-piece Llama 2 model), transformers' `llama3` RoPE initialisation (the
rope_freqs factors), the same weights written as an HF folder (same tensors), and
the `gguf` package's own quantizer/dequantizer for q8_0; for Llama 3, transformers' TikTokenConverter
(what the Hub's tokenizer.json holds, which llama.cpp's converter reads) and Meta's own ids for the
golden cases. Bad input: one `error:` line, nothing written.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from references import DATA, LLAMA2_TOKENIZER, REPO, STORIES, STORIES_TOKENIZER  # noqa: E402

from llama.errors import run_cli  # noqa: E402
from llama.formats.convert import convert  # noqa: E402
from llama.formats.layout import random_state_dict  # noqa: E402
from llama.formats.params import model_args  # noqa: E402

sys.path.insert(0, str(REPO))  # split_model.py lives at the repo root
import split_model  # noqa: E402

Q = gguf.GGMLQuantizationType
LLAMA3_TOKENIZER = DATA / "tokenizers" / "llama3" / "tokenizer.model"
# llama.cpp's names of Meta's per-layer weights (its llama-pth mapping, written out here by hand).
LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
               "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(meta_key: str) -> str:
    parts = meta_key.removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{LAYER_NAMES['.'.join(parts[2:])]}.weight"
    return f"{TOP_NAMES[parts[0]]}.weight"


def export(src: Path, out: Path, dtype: str = "float32", verify: bool = True) -> Path:
    return convert(src, out_format="gguf", out_dir=out, dtype=dtype, verify_output=verify, progress=False) / "model.gguf"


@pytest.fixture(scope="module")
def stories_weights() -> dict[str, torch.Tensor]:
    return torch.load(STORIES / "consolidated.00.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """stories260K exported once per dtype."""
    tmp = tmp_path_factory.mktemp("gguf")
    return {dtype: export(STORIES, tmp / dtype, dtype) for dtype in ("float32", "float16", "q8_0")}


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def numpy_shape(tensor) -> tuple[int, ...]:
    """GGUF stores dims innermost first (ggml's ne[]); torch's order is the reverse."""
    return tuple(int(n) for n in reversed(tensor.shape))


@pytest.mark.slow
def test_metadata_says_what_params_json_and_llama2c_say(exports):
    reader = gguf.GGUFReader(str(exports["float32"]))
    params = json.loads((STORIES / "params.json").read_text())
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.embedding_length") == params["dim"] == 64
    assert field("llama.block_count") == params["n_layers"] == 5
    assert field("llama.attention.head_count") == params["n_heads"] == 8
    assert field("llama.attention.head_count_kv") == params["n_kv_heads"] == 4
    assert field("llama.feed_forward_length") == 172  # llama2.c's hidden_dim (golden.json's model line)
    assert "hidden 172" in json.loads((DATA / "golden.json").read_text())["model"]
    assert field("llama.rope.dimension_count") == 64 // 8
    assert field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == np.float32(params["norm_eps"])
    assert field("llama.vocab_size") == params["vocab_size"] == 512
    assert field("llama.context_length") == 2048
    assert field("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.add_bos_token") is True
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.unknown_token_id") == 0
    assert reader.get_field("rope_freqs.weight") is None and "rope_freqs.weight" not in tensors_of(exports["float32"])
    for dtype, ftype in [("float16", gguf.LlamaFileType.MOSTLY_F16), ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0)]:
        assert gguf.GGUFReader(str(exports[dtype])).get_field("general.file_type").contents() == ftype


def assert_vocab_is_sentencepieces(gguf_path: Path, sp_path: Path) -> None:
    """tokens, scores and types equal sentencepiece's own pieces, scores and flags for every id."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_path))
    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    scores = reader.get_field("tokenizer.ggml.scores").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    n = sp.vocab_size()
    assert len(tokens) == len(scores) == len(types) == n
    assert tokens == [sp.id_to_piece(i) for i in range(n)]
    assert scores == [float(np.float32(sp.get_score(i))) for i in range(n)]  # GGUF stores float32
    T = gguf.TokenType
    want = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
            else T.BYTE if sp.is_byte(i) else T.NORMAL for i in range(n)]
    assert types == [int(t) for t in want]
    assert reader.get_field("tokenizer.ggml.bos_token_id").contents() == sp.bos_id()
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == sp.eos_id()


@pytest.mark.slow
def test_vocabulary_is_sentencepieces(exports):
    assert_vocab_is_sentencepieces(exports["float32"], STORIES_TOKENIZER)


def random_ckpt(path: Path, params: dict, tokenizer: Path, seed: int = 0, tied: bool = False) -> Path:
    """A 1-shard Meta checkpoint with random weights and the given tokenizer (tied: no output.weight, as Llama 3.2 1B)."""
    path.mkdir(parents=True)
    state = random_state_dict(model_args(params), seed=seed)
    if tied:
        del state["output.weight"]
    torch.save(state, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


@pytest.mark.slow
def test_llama2_vocabulary_with_bytes_and_controls(tmp_path):
    """Meta's 32000-piece Llama 2 model: 256 byte pieces, <s>/</s> controls, <unk> (a tiny random model carries it)."""
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 32000, "multiple_of": 32}
    path = export(random_ckpt(tmp_path / "llama2", params, LLAMA2_TOKENIZER), tmp_path / "out", verify=False)  # read once, below
    assert_vocab_is_sentencepieces(path, LLAMA2_TOKENIZER)


def expected_names(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    return {gguf_name(k): k for k in weights if k != "rope.freqs"}


@pytest.mark.slow
def test_float32_tensors_are_the_meta_weights_bit_for_bit(exports, stories_weights):
    """Names, shapes, types and bytes; q/k rows in Meta's order (llama.cpp's converter permutes HF's back to it)."""
    stored = tensors_of(exports["float32"])
    names = expected_names(stories_weights)
    assert set(stored) == set(names) and len(names) == 2 + 1 + 5 * 9
    for name, key in names.items():
        want = stories_weights[key].float().numpy()
        assert stored[name].tensor_type == Q.F32
        assert numpy_shape(stored[name]) == want.shape
        assert stored[name].data.tobytes() == want.tobytes(), name


@pytest.mark.slow
def test_float16_rounds_matrices_and_keeps_norms_float32(exports, stories_weights):
    """2-D weights are float16, rounded to nearest even (torch's cast, the IEEE rounding numpy uses too):
    within half a float16 ulp of the float32 weight; norms stay float32 and exact, as llama.cpp keeps them."""
    stored = tensors_of(exports["float16"])
    for name, key in expected_names(stories_weights).items():
        weight = stories_weights[key].float()
        if weight.dim() == 1:
            assert stored[name].tensor_type == Q.F32 and stored[name].data.tobytes() == weight.numpy().tobytes()
        else:
            assert stored[name].tensor_type == Q.F16
            assert numpy_shape(stored[name]) == tuple(weight.shape)
            assert stored[name].data.tobytes() == weight.half().numpy().tobytes(), name


# q8_0 stores, per block of 32 values along a row, a scale d = max|w| / 127 rounded to float16 and
# q = round(w / d) in [-127, 127]. Dequantized q * d16 errs by at most half a step, d / 2 (rounding
# q), plus |q| * |d - d16| <= 127 * d * 2^-11 (float16 keeps 11 significant bits, so rounding the
# scale moves it by at most 2^-11 relative): the bound is d * (1/2 + 127 / 2048) ~ 0.56 d.
Q8_BLOCK = 32
Q8_BOUND = 0.5 + 127 / 2048


@pytest.mark.slow
def test_q8_0_quantizes_whole_blocks_within_half_a_step(exports, stories_weights):
    stored = tensors_of(exports["q8_0"])
    seen = set()
    for name, key in expected_names(stories_weights).items():
        weight, got = stories_weights[key].float(), stored[name]
        if weight.dim() == 1:
            assert got.tensor_type == Q.F32
            continue
        if weight.shape[-1] % Q8_BLOCK:  # ffn_down's rows are 172 long: no whole blocks, float16 as llama.cpp falls back
            assert got.tensor_type == Q.F16 and got.data.tobytes() == weight.half().numpy().tobytes()
            seen.add("f16")
            continue
        assert got.tensor_type == Q.Q8_0 and numpy_shape(got) == tuple(weight.shape)
        dequantized = torch.from_numpy(gguf.quants.dequantize(got.data, Q.Q8_0).reshape(weight.shape))
        blocks, error = weight.reshape(-1, Q8_BLOCK), (dequantized - weight).reshape(-1, Q8_BLOCK)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        assert (error.abs() <= Q8_BOUND * step).all(), name
        assert error.abs().max() > 0.01 * step.max()  # it really was quantized
        seen.add("q8_0")
    assert seen == {"f16", "q8_0"}


@pytest.mark.slow
def test_an_hf_folder_exports_the_same_file_contents(exports, tmp_path):
    """Meta -> HF (q/k rows permuted to rotate-half) -> GGUF gives the Meta export's tensors and metadata
    (general.name aside, the folder's name):
    the HF reader un-permutes, so llama.cpp gets Meta's order either way."""
    hf = convert(STORIES, out_format="hf", out_dir=tmp_path / "hf", progress=False)
    from_hf = export(hf, tmp_path / "gguf")
    want, got = gguf.GGUFReader(str(exports["float32"])), gguf.GGUFReader(str(from_hf))
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for a, b in zip(got.tensors, want.tensors):
        assert a.tensor_type == b.tensor_type and a.data.tobytes() == b.data.tobytes(), a.name
    metadata = lambda reader: {k: f.contents() for k, f in reader.fields.items() if k != "general.name"}  # noqa: E731 (the folder's name)
    assert metadata(got) == metadata(want)


def test_llama31_rope_scaling_is_a_rope_freqs_tensor_of_transformers_factors(tmp_path):
    """llama.cpp divides each RoPE frequency by rope_freqs[i]: the factors are transformers' default
    inverse frequencies over its `llama3` ones. Both sides round to float32, each within ~1 ulp
    (2^-24 relative) of the exact ratio: 4 ulps of slack."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"dim": 64, "n_layers": 1, "n_heads": 2, "vocab_size": 512, "multiple_of": 32, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    path = export(random_ckpt(tmp_path / "llama31", params, STORIES_TOKENIZER), tmp_path / "out")
    stored = tensors_of(path)["rope_freqs.weight"]
    assert stored.tensor_type == Q.F32
    got = torch.from_numpy(stored.data.copy())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    default = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    torch.testing.assert_close(got, default / scaled, rtol=4 * 2**-24, atol=0)
    assert got.min() == 1 and got.max() == 8 and ((got > 1) & (got < 8)).any()  # all three bands present
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("llama.rope.freq_base").contents() == 500000.0
    assert reader.get_field("llama.context_length").contents() == 131072


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    """llama.cpp uses token_embd for the output projection when output.weight is absent (its tied-model path)."""
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 512, "multiple_of": 32}
    ckpt = random_ckpt(tmp_path / "tied", params, STORIES_TOKENIZER, tied=True)
    stored = tensors_of(export(ckpt, tmp_path / "out"))
    assert "output.weight" not in stored and "token_embd.weight" in stored and len(stored) == 2 + 9


@pytest.fixture(scope="module")
def llama3_vocab(tmp_path_factory) -> dict:
    """The tokenizer.ggml.* fields of a tiny random Llama 3.1-shaped model carrying Meta's tiktoken file."""
    tmp = tmp_path_factory.mktemp("llama3")
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 128256, "multiple_of": 32,
              "rope_theta": 500000.0, "use_scaled_rope": True}
    out = convert(random_ckpt(tmp / "ckpt", params, LLAMA3_TOKENIZER), out_format="gguf", out_dir=tmp / "out", progress=False)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    return {k.removeprefix("tokenizer.ggml."): f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.mark.slow
def test_llama3_vocabulary_is_what_the_hub_tokenizer_json_holds(llama3_vocab):
    """llama.cpp's converter reads Llama 3 from the Hub's tokenizer.json, which transformers' TikTokenConverter
    makes from Meta's file: the same byte-level tokens and merges (280147), specials as control tokens."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(LLAMA3_TOKENIZER))
    cases = json.loads((DATA / "llama3_tokenizer_cases.json").read_text())
    assert (llama3_vocab["model"], llama3_vocab["pre"]) == ("gpt2", "llama-bpe")
    tokens, types = llama3_vocab["tokens"], llama3_vocab["token_type"]
    assert len(tokens) == len(types) == cases["n_words"] == 128256
    assert tokens[:len(vocab)] == sorted(vocab, key=vocab.get)
    assert llama3_vocab["merges"] == [f"{left} {right}" for left, right in merges] and len(merges) == 280147
    assert types == [gguf.TokenType.NORMAL] * len(vocab) + [gguf.TokenType.CONTROL] * 256
    for text, token_id in cases["special_tokens"].items():
        assert tokens[token_id] == text
    assert (llama3_vocab["bos_token_id"], llama3_vocab["eos_token_id"]) == (cases["bos_id"], cases["eos_id"])
    assert llama3_vocab["add_bos_token"] is True and "scores" not in llama3_vocab


@pytest.mark.slow
def test_llama3_vocabulary_tokenizes_as_metas_tokenizer(llama3_vocab):
    """A BPE engine that is not tiktoken (HF `tokenizers`, with llama.cpp's llama-bpe settings: Meta's split
    pattern, byte-level, whole words taken as they are) given only the exported tokens and merges
    reproduces the ids Meta's own tokenizer gave for every golden case."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    cases = json.loads((DATA / "llama3_tokenizer_cases.json").read_text())
    tokens = llama3_vocab["tokens"][:128000]
    merges = [tuple(m.split(" ")) for m in llama3_vocab["merges"]]
    bpe = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(cases["pat_str"]), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert len(cases["cases"]) > 5
    for case in cases["cases"]:
        assert bpe.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"][:40]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: split_model.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.slow
def test_cli_writes_model_gguf_and_manifest(capsys, tmp_path):
    code, out, _ = run_main(capsys, "--ckpt_dir", STORIES, "--out_format", "gguf", "--out_dir", tmp_path / "o", "--dtype", "q8_0", "--verify")
    assert code == 0 and "model.gguf, verified" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["format"] == "gguf" and manifest["dtype"] == "q8_0" and manifest["verified"] is True
    assert sorted(f["name"] for f in manifest["files"]) == ["model.gguf", "tokenizer.model"]


BAD = {
    "unsupported dtype": ("--dtype bfloat16 is not a GGUF type", "bfloat16"),
    "gguf not installed": ("pip install -e .[gguf]", "float32"),
    "tokenizer of another model": ("has 32000 tokens but the model's vocab_size is 512", "float32"),
    "no tokenizer": ("no tokenizer.model", "float32"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_nothing_written(monkeypatch, capsys, tmp_path, case):
    message, dtype = BAD[case]
    ckpt = STORIES
    if case == "gguf not installed":
        monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    if case in ("tokenizer of another model", "no tokenizer"):
        ckpt = tmp_path / "ckpt"
        shutil.copytree(STORIES, ckpt)
        if case == "no tokenizer":
            (ckpt / "tokenizer.model").unlink()
        else:
            shutil.copyfile(LLAMA2_TOKENIZER, ckpt / "tokenizer.model")
    out_dir = tmp_path / "out"
    code, out, err = run_main(capsys, "--ckpt_dir", ckpt, "--out_format", "gguf", "--out_dir", out_dir, "--dtype", dtype)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out_dir.exists()
