"""Hugging Face folders in and out, checked against transformers itself, llama2.c and round trips.

In: a random Llama-2-style GQA model built by transformers from a LlamaConfig (no download) and
saved sharded (safetensors + index), and the test's own copy of the same weights in Meta layout
(names and q/k rows converted here, by inverting transformers' `permute` of
convert_llama_weights_to_hf.py, not by llama/formats/hf.py). Both load on 1 and 2 ranks and match
transformers' forward computed in float64; the 2-rank run is shown to read only its slices.
Out: stories260K -> HF folder -> transformers reproduces llama2.c's golden greedy ids; the Meta
and HF layouts round-trip byte for byte; an HF folder runs example.py directly and on 2 ranks.
Bad input: one `error:` line, exit 2, nothing written.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, torchrun
from references import GOLDEN, LLAMA2_TOKENIZER, STORIES

from llama.errors import run_cli
from llama.files import STAGING as PARTIAL
from llama.formats import open_checkpoint
from llama.formats.layout import random_state_dict, shard_state_dict
from llama.config import LoadSpec
from llama.formats.load import load_model
from llama.formats.params import model_args

sys.path.insert(0, str(REPO))  # example.py and split_model.py live at the repo root
import example  # noqa: E402
import split_model  # noqa: E402

# Llama-2-style GQA (4 query heads per kv head); every split size divides 2.
HF_CONFIG = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)
# The same model as Meta's params.json says it: 2/3 * 4 * 128 = 341, rounded up to a multiple of 8 = 344.
META_PARAMS = {"dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 8,
               "norm_eps": 1e-5, "rope_theta": 10000.0}
# q/k weights this many times the unit-gain scale: attention scores then have a std of ~4, so
# attention is sharp and position-dependent, and rows in the wrong order (or RoPE on the wrong
# pairs) change the logits by O(1), far beyond LOGITS_ATOL (checked below, not assumed).
QK_GAIN = 2.0
# Our float32 forward vs transformers' in float64. Both compute RoPE angles in float32
# (transformers casts to float32 on purpose), so the difference is our float32 rounding: a dot
# product of length K <= 344 errs by ~sqrt(K) x 6e-8 ~ 1e-6 relative; ~12 such products in a row
# (2 layers), a softmax whose scores have a std of ~4 (gain up to ~4) and logits up to ~4 give
# ~2e-4 at most, whatever the summation order (2 ranks, ATEN_CPU_CAPABILITY=default), and
# ~10^3 below what a layout error causes (checked below).
LOGITS_ATOL = 2e-4
# transformers' float32 logits vs llama2.c's on stories260K: the bound references.PRECISIONS uses
# for our own float32 model (both are float32 with their own summation orders).
LLAMA2C_ATOL = 1e-4
HF_TO_META = [("model.", ""), ("embed_tokens", "tok_embeddings"), ("lm_head", "output"), ("self_attn.q_proj", "attention.wq"),
              ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
              ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
              ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm")]


def meta_name(hf_name: str) -> str:
    for old, new in HF_TO_META:
        hf_name = hf_name.replace(old, new)
    return hf_name


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of transformers' `permute(w, n_heads, dim1, dim2) = w.view(n_heads, dim1 // n_heads // 2, 2, dim2)
    .transpose(1, 2).reshape(dim1, dim2)`: HF's rotate-half rows back to Meta's interleaved pairs."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_state(hf_state: dict[str, torch.Tensor], unpermute_qk: bool = True) -> dict[str, torch.Tensor]:
    """The HF state dict under Meta's names, q/k rows in Meta's order (unless told not to)."""
    state = {}
    for name, tensor in hf_state.items():
        key = meta_name(name)
        if unpermute_qk and key.endswith("attention.wq.weight"):
            tensor = unpermute(tensor, HF_CONFIG["num_attention_heads"])
        elif unpermute_qk and key.endswith("attention.wk.weight"):
            tensor = unpermute(tensor, HF_CONFIG["num_key_value_heads"])
        state[key] = tensor.clone()
    return state


def write_meta(ckpt_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    ckpt_dir.mkdir()
    torch.save(state, ckpt_dir / "consolidated.00.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(META_PARAMS))
    return ckpt_dir


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-gain random weights (norms near 1, q/k scaled by QK_GAIN), instead of transformers'
    std-0.02 init, under which attention is nearly uniform and position-blind."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                gain = QK_GAIN if ("q_proj" in name or "k_proj" in name) else 1.0
                param.copy_(noise * gain / param.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> dict:
    """An HF folder saved by transformers (5 safetensors files + index), its Meta copy, fixed
    tokens and transformers' float64 logits on them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("hf_in")
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
    randomize(model, seed=0)
    model.save_pretrained(tmp / "hf", max_shard_size="400KB")
    hf_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.double()(tokens).logits.float()
    torch.save(tokens, tmp / "tokens.pt")
    return {"hf": tmp / "hf", "meta": write_meta(tmp / "meta", meta_state(hf_state)), "tmp": tmp, "tokens": tokens,
            "reference": reference, "hf_state": hf_state}


@pytest.mark.slow
def test_transformers_saved_a_sharded_folder(random_model):
    names = sorted(p.name for p in random_model["hf"].iterdir())
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 2, names


def logits_of(ckpt_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    spec = LoadSpec(ckpt_dir, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0], dtype=torch.float32)
    model = load_model(spec, vocab_size=None, device=torch.device("cpu"))
    with torch.inference_mode():
        return model(tokens, 0), model.state_dict()


@pytest.mark.slow
def test_hf_folder_and_meta_copy_match_transformers_on_one_rank(world1, random_model):
    tokens, reference = random_model["tokens"], random_model["reference"]
    hf_logits, hf_weights = logits_of(random_model["hf"], tokens)
    meta_logits, meta_weights = logits_of(random_model["meta"], tokens)
    assert reference.abs().max() > 2  # logits of a useful size for an absolute tolerance
    torch.testing.assert_close(meta_logits, reference, rtol=0, atol=LOGITS_ATOL)
    # The same weights through the same code: bit-identical, not merely close.
    assert all(torch.equal(hf_weights[k], meta_weights[k]) for k in meta_weights)
    assert torch.equal(hf_logits, meta_logits)


@pytest.mark.slow
def test_the_comparison_catches_rows_left_in_hf_order(world1, random_model):
    """A Meta copy without the q/k un-permutation is off by far more than the tolerance."""
    wrong = write_meta(random_model["tmp"] / "meta_rotate_half", meta_state(random_model["hf_state"], unpermute_qk=False))
    logits, _ = logits_of(wrong, random_model["tokens"])
    assert (logits - random_model["reference"]).abs().max() > 1000 * LOGITS_ATOL


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_read_only_their_slices_and_match(random_model):
    """tests/hf_worker.py loads both copies on 2 ranks; every safetensors read is recorded."""
    out = random_model["tmp"] / "tp2"
    out.mkdir()
    result = torchrun(2, "tests/hf_worker.py", "--hf", random_model["hf"], "--meta", random_model["meta"],
                      "--tokens", random_model["tmp"] / "tokens.pt", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    full = meta_state(random_model["hf_state"])
    hf_bytes = {name: t.nbytes for name, t in random_model["hf_state"].items()}
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt", weights_only=True)
        # This rank's weights are exactly its slice of the whole model, from either copy.
        expected = shard_state_dict(full, rank, 2)
        for key, tensor in expected.items():
            assert torch.equal(got["hf_state"][key], tensor) and torch.equal(got["meta_state"][key], tensor), key
        assert torch.equal(got["hf_logits"], got["meta_logits"])
        torch.testing.assert_close(got["hf_logits"], random_model["reference"], rtol=0, atol=LOGITS_ATOL)
        # Reads: only through get_slice, once per tensor, half of every split tensor, whole norms.
        reads = got["reads"]
        assert {kind for kind, *_ in reads} == {"slice"}, "a whole tensor was read with get_tensor"
        assert sorted(name for _, name, _, _ in reads) == sorted(hf_bytes)
        for _, name, shape, nbytes in reads:
            whole = name.endswith("norm.weight")
            assert nbytes == (hf_bytes[name] if whole else hf_bytes[name] // 2), (name, shape)
        split = sum(n for name, n in hf_bytes.items() if not name.endswith("norm.weight"))
        assert sum(r[3] for r in reads) < 0.51 * split + (sum(hf_bytes.values()) - split)


# --- out: stories260K as an HF folder ------------------------------------------------------------

def run_main(capsys, main, *argv) -> tuple[int, str, str]:
    """A script's main(argv) in-process, through run_cli as `python script.py` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_example(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """`python example.py ARGV` in-process (example.main reads sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["example.py", *map(str, argv)])
    return run_main(capsys, lambda _: example.main())


def to_hf(capsys, src: Path, out: Path, *extra) -> Path:
    code, _, err = run_main(capsys, split_model.main, "--ckpt_dir", src, "--out_format", "hf", "--out_dir", out, *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def stories_hf(tmp_path_factory) -> Path:
    """stories260K written by `split_model.py --out_format hf` (small --max_shard_size: an index too)."""
    out = tmp_path_factory.mktemp("stories") / "stories260K_hf"
    with pytest.MonkeyPatch.context() as mp:  # keep capsys out of a module fixture
        mp.setattr(sys, "argv", ["split_model.py"])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: split_model.main(["--ckpt_dir", str(STORIES), "--out_format", "hf", "--out_dir", str(out),
                                              "--max_shard_size", "300KB", "--verify"]))
    assert exit_info.value.code == 0
    return out


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_transformers(folder: Path):
    """AutoModelForCausalLM.from_pretrained with transformers' warnings recorded."""
    from transformers import AutoModelForCausalLM

    recorder, logger = Recorder(), logging.getLogger("transformers")
    logger.addHandler(recorder)  # transformers' root logger does not propagate to the root logger
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    finally:
        logger.removeHandler(recorder)
    return model.eval(), info, recorder.messages


@pytest.mark.slow
def test_transformers_loads_the_folder_without_warnings_and_reproduces_llama2c(stories_hf):
    files = sorted(p.name for p in stories_hf.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model", "manifest.json"} <= set(files)
    model, info, warnings = load_with_transformers(stories_hf)
    assert all(not keys for keys in info.values()), info  # missing, unexpected, mismatched keys, errors
    assert not [w for w in warnings if "key" in w.lower() or "initialized" in w.lower()], warnings
    assert model.dtype == torch.float32
    case = GOLDEN["greedy_bos_200"]
    # Greedy ids from a different implementation are only comparable if no step is a near tie:
    # the golden run's smallest top1-top2 margin is 0.0042, while float32 transformers and
    # float32 llama2.c differ by float32 rounding over 5 layers of width 64: ~1e-5 on logits of
    # |x| < 20 (6e-8 x 20 x a few accumulation steps), bounded by LLAMA2C_ATOL on the first steps
    # against llama2.c's own logits below. Two logits moving LLAMA2C_ATOL apart cannot swap a
    # pair 0.0042 apart, with a 10x safety factor.
    assert case["min_top1_top2_logit_margin_over_sampled_steps"] > 10 * 2 * LLAMA2C_ATOL
    with torch.no_grad():
        steps = GOLDEN["greedy_bos_first5_steps_top5"]["steps"]
        logits = model(torch.tensor([[s["input_token"] for s in steps]])).logits[0]
        for step, row in zip(steps, logits):
            top = row.topk(5)
            assert top.indices.tolist() == step["top5_ids"]
            torch.testing.assert_close(top.values, torch.tensor(step["top5_logits"]), rtol=0, atol=LLAMA2C_ATOL)
        ids = model.generate(torch.tensor([case["prompt_ids"]]), max_new_tokens=case["n_generated"], do_sample=False)
    assert ids[0, len(case["prompt_ids"]):].tolist() == case["generated_ids"]


@pytest.mark.slow
def test_the_warning_check_sees_a_missing_weight(stories_hf, tmp_path):
    """Control for the test above: a folder without model.norm.weight makes transformers say so."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(stories_hf, tmp_path / "no_norm")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"].pop("model.norm.weight")
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, info, warnings = load_with_transformers(folder)
    assert "model.norm.weight" in info["missing_keys"] and any("model.norm.weight" in w for w in warnings), warnings


@pytest.mark.slow
def test_meta_to_hf_to_meta_is_byte_identical(capsys, stories_hf, tmp_path):
    code, _, err = run_main(capsys, split_model.main, "--ckpt_dir", stories_hf, "--num_shards", 1, "--out_dir", tmp_path / "back", "--verify")
    assert code == 0, err
    assert (tmp_path / "back" / "consolidated.00.pth").read_bytes() == (STORIES / "consolidated.00.pth").read_bytes()
    assert open_checkpoint(tmp_path / "back").args == open_checkpoint(STORIES).args


def golden_default_ids() -> list[list[int]]:
    """example.py's default prompts, greedy, 64 new tokens: llama2.c's ids (see test_cli.py)."""
    return [GOLDEN[name]["generated_ids"][:64] for name in ("greedy_prompt_once_upon_a_time", "greedy_prompt_lily_park")]


def json_ids(stdout: str) -> list[list[int]]:
    return [json.loads(line)["ids"] for line in stdout.splitlines()]


@pytest.mark.slow
def test_hf_folder_runs_example_directly_and_in_the_hub_layout(monkeypatch, capsys, stories_hf, tmp_path):
    # The golden prompts' smallest top1-top2 margins (in golden.json) are far above float32 noise.
    code, out, err = run_example(monkeypatch, capsys, "--ckpt_dir", stories_hf, "--json")
    assert code == 0, err
    assert json_ids(out) == golden_default_ids()
    hub = shutil.copytree(stories_hf, tmp_path / "hub")  # Llama 3 repos keep Meta's tokenizer in original/
    (hub / "original").mkdir()
    (hub / "tokenizer.model").rename(hub / "original" / "tokenizer.model")
    code, out, err = run_example(monkeypatch, capsys, "--ckpt_dir", hub, "--json")
    assert code == 0, err
    assert json_ids(out) == golden_default_ids()


@pytest.mark.slow
@pytest.mark.dist
def test_hf_to_two_meta_shards_runs_on_two_ranks(capsys, stories_hf, tmp_path):
    out = tmp_path / "mp2"
    code, _, err = run_main(capsys, split_model.main, "--ckpt_dir", stories_hf, "--num_shards", 2, "--out_dir", out, "--verify")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    result = torchrun(2, "example.py", "--ckpt_dir", out, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    # test_cli.py checks these ids on 2 ranks with the original files (margins as noted there).
    assert json_ids(result.stdout) == golden_default_ids()


# --- bad input ------------------------------------------------------------------------------------

class PickledThing:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


def make_bad_input(case: str, tmp: Path, hf_dir: Path) -> tuple[list, str]:
    """(split_model.py or example.py and its arguments, text the one error line must contain)."""
    ckpt = tmp / "ckpt"
    if case == "hf folder without weights":
        ckpt.mkdir()
        shutil.copy(hf_dir / "config.json", ckpt)
        return ["split", ckpt], "has config.json but no model.safetensors or model.safetensors.index.json"
    if case == "index names a missing file":
        shutil.copytree(hf_dir, ckpt)
        second = sorted(ckpt.glob("model-*.safetensors"))[1]
        second.unlink()
        (ckpt / "manifest.json").unlink()  # without our manifest (a folder from the Hub), the index is what names it
        return ["split", ckpt], f"names ['{second.name}'], missing from"
    if case == "another architecture":
        shutil.copytree(hf_dir, ckpt)
        config = json.loads((ckpt / "config.json").read_text())
        config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
        (ckpt / "config.json").write_text(json.dumps(config))
        return ["split", ckpt], "describes MistralForCausalLM, not LlamaForCausalLM"
    if case == "tokenizer vocab mismatch":
        return ["example", "--ckpt_dir", hf_dir, "--tokenizer_path", LLAMA2_TOKENIZER], "tokenizer has 32000 tokens but config.json says vocab_size 512"
    if case == "not a tiktoken file":
        bad = tmp / "tokenizer.model"
        bad.write_bytes(b"IQ== 0\nIg== 1\nthis is not base64 and no rank\n")
        return ["example", "--ckpt_dir", hf_dir, "--tokenizer_path", bad], "is not a tiktoken BPE file"
    if case == "pickled object in a .pth":
        ckpt.mkdir()
        shutil.copy(STORIES / "params.json", ckpt)
        torch.save({"tok_embeddings.weight": torch.zeros(2), "hook": PickledThing()}, ckpt / "consolidated.00.pth")
        return ["split", ckpt], "refusing to load"
    if case == "killed conversion":
        (ckpt / PARTIAL).mkdir(parents=True)
        (ckpt / PARTIAL / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 100)
        return ["example", "--ckpt_dir", ckpt], "partial output of an interrupted conversion"
    raise AssertionError(case)


BAD_INPUTS = ["hf folder without weights", "index names a missing file", "another architecture", "tokenizer vocab mismatch",
              "not a tiktoken file", "pickled object in a .pth", "killed conversion"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_nothing_written(monkeypatch, capsys, stories_hf, tmp_path, case):
    (script, *argv), message = make_bad_input(case, tmp_path, stories_hf)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if script == "split":
        code, out, err = run_main(capsys, split_model.main, "--ckpt_dir", *argv, "--num_shards", 2, "--out_dir", tmp_path / "out")
    else:
        code, out, err = run_example(monkeypatch, capsys, *argv, "--json")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "weights_only" not in err  # torch's advice to unpickle code is never repeated
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


@pytest.mark.slow
def test_rerun_replaces_a_killed_conversion_without_force(capsys, stories_hf, tmp_path):
    out = tmp_path / "out"
    (out / PARTIAL).mkdir(parents=True)
    (out / PARTIAL / "model.safetensors").write_bytes(b"\0" * 100)  # what SIGKILL mid-write leaves
    code, _, err = run_main(capsys, split_model.main, "--ckpt_dir", STORIES, "--out_format", "hf", "--out_dir", out, "--max_shard_size", "300KB")
    assert code == 0, err
    assert not (out / PARTIAL).exists()
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == {p.name: p.read_bytes() for p in stories_hf.glob("*.safetensors")}


@pytest.mark.slow
def test_sigterm_during_a_conversion_leaves_nothing(tmp_path):
    """`python split_model.py` killed with SIGTERM while writing: no output folder, exit 130."""
    params = {"dim": 512, "n_layers": 6, "n_heads": 8, "vocab_size": 512, "multiple_of": 256}  # ~75 MB in float32
    src = tmp_path / "src"
    src.mkdir()
    torch.save(random_state_dict(model_args(params)), src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps(params))
    out = tmp_path / "out"
    cmd = [sys.executable, "split_model.py", "--ckpt_dir", str(src), "--out_format", "hf", "--out_dir", str(out), "--max_shard_size", "10MB"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any((out / PARTIAL).glob("*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # until the first file is being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists()
