"""split_model.py: M -> N resharding is bit-identical, loads under torchrun, fails cleanly; the planner.

References: the bundled 1-shard stories260K, the data provider's independent 2-shard copy of it
(tests/data/stories260K_mp2), llama2.c-exact greedy ids from `example.py` on the original, and
a random Llama-2-style GQA checkpoint (vocab_size -1 in params.json, as in Meta's files).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, python, torchrun

from llama import distributed
from llama.config import LoadSpec
from llama.errors import UserError, run_cli
from llama.files import file_sha256
from llama.formats import plan
from llama.formats.checkpoint import same_bits
from llama.formats.convert import reshard
from llama.formats.layout import random_state_dict, rank_slice, shard_state_dict
from llama.formats.load import load_model
from llama.formats.params import model_args
from llama.generation import Llama
from llama.model import Transformer
from llama.sampling import Sampling

sys.path.insert(0, str(REPO))  # split_model.py lives at the repo root
import example  # noqa: E402
import split_model  # noqa: E402

STORIES = REPO / "ckpts" / "stories260K"
STORIES_MP2 = REPO / "tests" / "data" / "stories260K_mp2"
# Llama-2-style: GQA (2 query heads per kv head), ffn_dim_multiplier, rope_theta; every split dim divides 8.
RANDOM_PARAMS = {"dim": 128, "n_layers": 2, "n_heads": 16, "n_kv_heads": 8, "vocab_size": -1, "multiple_of": 32,
                 "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
RANDOM_VOCAB = 256


def shards_of(ckpt_dir: Path) -> list[dict[str, torch.Tensor]]:
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    return [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]


def assert_same_checkpoint(got_dir: Path, want_dir: Path) -> None:
    """Same shard count, same weight names in the same order, every tensor bit-identical."""
    got, want = shards_of(got_dir), shards_of(want_dir)
    assert len(got) == len(want)
    for got_shard, want_shard in zip(got, want):
        assert list(got_shard) == list(want_shard)
        for key in want_shard:
            assert same_bits(got_shard[key], want_shard[key]), key


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    """A 1-shard random checkpoint written the way Meta's are (params.json says vocab_size -1)."""
    ckpt_dir = tmp_path_factory.mktemp("random") / "llama2_gqa"
    ckpt_dir.mkdir()
    args = model_args(RANDOM_PARAMS, RANDOM_VOCAB)
    torch.save(random_state_dict(args, seed=3), ckpt_dir / "consolidated.00.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(RANDOM_PARAMS))
    return ckpt_dir


def split(src: Path, n: int, out: Path, **kwargs) -> Path:
    return reshard(src, num_shards=n, out_dir=out, progress=False, **kwargs)


def test_split_reproduces_the_providers_two_shard_files(tmp_path):
    assert_same_checkpoint(split(STORIES, 2, tmp_path / "mp2"), STORIES_MP2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["stories260K", "random_gqa"])
def test_round_trips_are_bit_identical(tmp_path, random_ckpt, model):
    one = STORIES if model == "stories260K" else random_ckpt
    two = STORIES_MP2 if model == "stories260K" else split(one, 2, tmp_path / "1to2")
    four = split(one, 4, tmp_path / "1to4")
    assert_same_checkpoint(split(four, 1, tmp_path / "1to4to1"), one)
    assert_same_checkpoint(split(split(one, 2, tmp_path / "1to2b"), 4, tmp_path / "1to2to4"), four)
    assert_same_checkpoint(split(two, 1, tmp_path / "2to1"), one)
    assert_same_checkpoint(split(tmp_path / "2to1", 2, tmp_path / "2to1to2"), two)
    assert_same_checkpoint(split(four, 2, tmp_path / "4to2"), two)
    if model == "random_gqa":  # 8 -> 2, and the 2 shards against an in-memory split of the weights
        assert_same_checkpoint(split(split(one, 8, tmp_path / "1to8"), 2, tmp_path / "1to8to2"), two)
        state = torch.load(one / "consolidated.00.pth", weights_only=True)
        for rank, shard in enumerate(shards_of(two)):
            expected = shard_state_dict(state, rank, 2)
            assert all(same_bits(shard[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_dtype_conversion_verify_and_manifest(tmp_path, random_ckpt):
    out = split(random_ckpt, 2, tmp_path / "bf16", dtype=torch.bfloat16, verify_output=True)
    source = torch.load(random_ckpt / "consolidated.00.pth", weights_only=True)
    for rank, shard in enumerate(shards_of(out)):
        for key, value in source.items():
            assert same_bits(shard[key], rank_slice(key, [value], rank=rank, n_ranks=2).to(torch.bfloat16)), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["source_shards"], manifest["num_shards"], manifest["dtype"], manifest["verified"]) == (1, 2, "bfloat16", True)
    assert [f["name"] for f in manifest["files"]] == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    for entry in manifest["files"]:
        assert entry["bytes"] == (out / entry["name"]).stat().st_size
        assert entry["sha256"] == file_sha256(out / entry["name"])
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "manifest.json", "params.json"]


def test_verify_catches_a_wrong_tensor(tmp_path, monkeypatch):
    from llama.formats import meta as reshard_module

    real = reshard_module.out_tensor

    def faulty(ckpt, key, *, rank, num_shards, dtype):
        tensor = real(ckpt, key, rank=rank, num_shards=num_shards, dtype=dtype)
        if key == "layers.3.feed_forward.w2.weight" and rank == 1:
            tensor[0, 0] = torch.nextafter(tensor[0, 0], torch.tensor(1.0))  # one ulp
        return tensor

    monkeypatch.setattr(reshard_module, "out_tensor", faulty)
    with pytest.raises(UserError, match="verification failed: 'layers.3.feed_forward.w2.weight'"):
        split(STORIES, 2, tmp_path / "out", verify_output=True)
    assert not (tmp_path / "out").exists()


def test_interrupt_or_error_leaves_no_files_and_force_replaces(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save, saves = torch.save, []

    def save_then_interrupt(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        split(STORIES, 4, out)
    assert not out.exists()  # created by the run, removed with everything in it

    monkeypatch.setattr(torch, "save", real_save)
    split(STORIES, 4, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(torch, "save", save_then_interrupt)
    saves.clear()
    with pytest.raises(KeyboardInterrupt):
        split(STORIES, 2, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output is untouched

    monkeypatch.setattr(torch, "save", real_save)
    split(STORIES, 2, out, force=True)  # replaces the 4 shards: no consolidated.02/03 left behind
    assert_same_checkpoint(out, STORIES_MP2)
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 2


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """split_model's CLI in-process, through run_cli as `python split_model.py` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: split_model.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_shard(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def edit_params(ckpt_dir: Path, **changes) -> None:
    params = json.loads((ckpt_dir / "params.json").read_text())
    (ckpt_dir / "params.json").write_text(json.dumps({**params, **changes}))


def make_bad_input(case: str, tmp: Path) -> tuple[Path, int, str]:
    """(ckpt_dir, N, text the error line must contain) for each bad input of issue 4."""
    ckpt = tmp / "ckpt"
    if case == "missing dir":
        return ckpt, 2, "not found"
    if case == "no shards":
        ckpt.mkdir()
        shutil.copy(STORIES / "params.json", ckpt)
        return ckpt, 2, "no consolidated.NN.pth shards"
    if case == "missing params.json":
        copy_ckpt(STORIES, ckpt)
        (ckpt / "params.json").unlink()
        return ckpt, 2, "it needs params.json (Meta layout) or config.json"
    if case == "gap in numbering":
        copy_ckpt(STORIES_MP2, ckpt)
        (ckpt / "consolidated.01.pth").rename(ckpt / "consolidated.02.pth")
        return ckpt, 2, "missing ['consolidated.01.pth']"
    if case == "truncated shard":
        copy_ckpt(STORIES_MP2, ckpt)
        data = (ckpt / "consolidated.01.pth").read_bytes()
        (ckpt / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
        return ckpt, 2, "cannot read"
    if case == "corrupt shard":
        copy_ckpt(STORIES, ckpt)
        (ckpt / "consolidated.00.pth").write_bytes(b"not a checkpoint" * 100)
        return ckpt, 2, "cannot read"
    if case == "shape mismatch between shards":
        copy_ckpt(STORIES_MP2, ckpt)
        edit_shard(ckpt / "consolidated.01.pth", lambda s: s.update({"layers.2.attention.wq.weight": torch.zeros(24, 64)}))
        return ckpt, 2, "'layers.2.attention.wq.weight' has shape (24, 64) in one shard and (32, 64) in another"
    if case == "replicated weight differs":
        copy_ckpt(STORIES_MP2, ckpt)
        edit_shard(ckpt / "consolidated.01.pth", lambda s: s["norm.weight"].add_(1))
        return ckpt, 2, "replicated weight 'norm.weight' differs"
    if case == "params dim disagrees":
        edit_params(copy_ckpt(STORIES, ckpt), dim=128, n_heads=16)
        return ckpt, 2, "but params.json implies"
    if case == "params layers disagree":
        edit_params(copy_ckpt(STORIES, ckpt), n_layers=6)
        return ckpt, 2, "checkpoint lacks weights"
    if case == "params vocab disagrees":
        edit_params(copy_ckpt(STORIES, ckpt), vocab_size=500)
        return ckpt, 2, "'output.weight' is (512, 64) but params.json implies (500, 64)"
    if case == "unknown weight":
        copy_ckpt(STORIES, ckpt)
        edit_shard(ckpt / "consolidated.00.pth", lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)}))
        return ckpt, 2, "unknown weight 'layers.0.attention.wq.bias'"
    if case == "N does not divide":
        return copy_ckpt(STORIES, ckpt), 8, "8 shards do not divide n_kv_heads=4, hidden_dim=172; numbers of shards that work: [1, 2, 4]"
    raise AssertionError(case)


BAD_INPUTS = ["missing dir", "no shards", "missing params.json", "gap in numbering", "truncated shard", "corrupt shard",
              "shape mismatch between shards", "replicated weight differs", "params dim disagrees",
              "params layers disagree", "params vocab disagrees", "unknown weight", "N does not divide"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_no_output(tmp_path, capsys, case):
    ckpt, n, message = make_bad_input(case, tmp_path)
    code, out, err = run_main(capsys, "--ckpt_dir", ckpt, "--num_shards", n, "--out_dir", tmp_path / "out", "--verify")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_existing_output_and_input_as_output_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, "--ckpt_dir", STORIES, "--num_shards", 2, "--out_dir", out)
    assert code == 2 and err.count("\n") == 1 and "pass --force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = run_main(capsys, "--ckpt_dir", STORIES, "--num_shards", 2, "--out_dir", STORIES, "--force")
    assert code == 2 and "is the input directory" in err


def test_default_out_dir_is_dir_mpN(tmp_path, capsys):
    ckpt = copy_ckpt(STORIES, tmp_path / "stories260K")
    code, out, _ = run_main(capsys, "--ckpt_dir", ckpt, "--num_shards", 4)
    assert code == 0 and "torchrun --nproc_per_node 4" in out
    assert_same_checkpoint(tmp_path / "stories260K_mp4", split(STORIES, 4, tmp_path / "ref"))


@pytest.mark.slow
def test_a_bad_input_through_the_real_cli_has_no_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt, n, message = make_bad_input("truncated shard", tmp_path)
    result = python("split_model.py", "--ckpt_dir", ckpt, "--num_shards", n, "--out_dir", tmp_path / "out")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def original_greedy_ids() -> list[list[int]]:
    """What `python example.py --json` prints for the 1-shard original, computed in-process."""
    llm = Llama.build(STORIES, max_seq_len=512, max_batch_size=4)  # example.py's defaults
    try:
        results = llm.text_completion(example.DEFAULT_PROMPTS, Sampling(max_tokens=64))
    finally:
        distributed.teardown()
    assert all(len(r.ids) > 10 for r in results)
    return [r.ids for r in results]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("n", [2, 4])
def test_torchrun_on_the_split_gives_the_original_greedy_ids(tmp_path, original_greedy_ids, n):
    out = split(STORIES, n, tmp_path / f"stories260K_mp{n}", verify_output=True)
    result = torchrun(n, "example.py", "--ckpt_dir", out, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["ids"] for line in result.stdout.splitlines()] == original_greedy_ids


# --- planner -------------------------------------------------------------------------------------

LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA2_70B = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
              "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}


def test_planner_parameter_counts_match_metas_models():
    assert plan.parameter_count(model_args(LLAMA2_7B, 32000)) == 6_738_415_616
    assert plan.parameter_count(model_args(LLAMA2_70B, 32000)) == 68_976_648_192


def test_planner_weights_and_kv_cache_are_exact(tmp_path, world1):
    args = model_args(json.loads((STORIES / "params.json").read_text()))
    for n in (1, 2, 4):
        shard = shards_of(split(STORIES, n, tmp_path / f"mp{n}"))[0]
        loaded = sum(t.numel() * t.element_size() for k, t in shard.items() if k != "rope.freqs")
        assert plan.weight_bytes(args, n, 4) == loaded
    model = load_model(LoadSpec(STORIES, max_seq_len=40, max_batch_size=3, dtype=torch.float32), vocab_size=None, device=torch.device("cpu"))
    cache = sum(buf.nbytes for layer in model.layers for buf in (layer.attention.cache.k, layer.attention.cache.v))
    assert plan.kv_cache_bytes(args, 1, batch=3, seq_len=40, dtype_bytes=4) == cache


def load_model_from_state(args, state: dict[str, torch.Tensor]):
    """A frozen bf16 model for a training-style forward (no KV cache)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items() if k != "rope.freqs"}, assign=True)
    model.requires_grad_(False)
    model.setup_caches(0, 64)
    return model.train()


def test_planner_saved_activations_match_autograd(world1):
    """Bytes autograd keeps for a prompt-tuning backward, counted with saved-tensor hooks.

    The formula leaves out per-token scalars (RMSNorm's rsqrt, attention's logsumexp) and the
    S x S mask, a few percent at this tiny width and far less at real ones: 5% tolerance.
    """
    args = model_args(RANDOM_PARAMS, RANDOM_VOCAB)
    model = load_model_from_state(args, random_state_dict(args, seed=1, dtype=torch.bfloat16))
    batch, seq_len, n_prefix = 2, 48, 8
    prefix = torch.zeros(batch, n_prefix, args.dim, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, RANDOM_VOCAB, (batch, seq_len - n_prefix))
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), model.rope]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(tokens, prefix=prefix)
    predicted = plan.saved_for_backward_bytes(args, 1, batch * seq_len, 2)
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.05)


def test_plan_cli(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(LLAMA2_7B))
    code, out, err = run_main(capsys, "--plan", "--params", params, "--vocab_size", 32000, "--gpu_mem", "12GiB",
                              "--batch_size", 8, "--seq_len", 512)
    assert code == 0, err
    assert "6.74 B parameters" in out and "smallest N that fits 12.0 GiB cards: 2" in out
    code, out, err = run_main(capsys, "--plan", "--ckpt_dir", STORIES, "--mode", "prompt-tune")
    assert code == 0 and "vocab 512" in out and "split dims do not divide" in out  # N=8 vs kv heads 4
    code, _, err = run_main(capsys, "--plan", "--params", params, "--gpu_mem", "12 bananas")
    assert code == 2 and "vocab_size -1" in err
    code, _, err = run_main(capsys, "--plan", "--params", params, "--vocab_size", 32000, "--gpu_mem", "12 bananas")
    assert code == 2 and "cannot read memory size '12 bananas'" in err
