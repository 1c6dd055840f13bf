"""ft_main.py --method lora and --method full end to end on the bundled stories260K (fp32, CPU, gloo).

- TP=2 (model split) and dp=2 (2 x half batches; ZeRO-sharded AdamW for full) equal TP=1: losses,
  eval losses and each tensor's update, within fp32 reordering tolerances; replicated tensors
  (LoRA's A under column-parallel layers and B under row-parallel ones, the norms) are
  bit-identical on every tensor-parallel rank; the planner's per-card terms match what they held;
- both learn: the held-out loss falls well below the untuned model's;
- resume after step 3 reproduces the uninterrupted run exactly (also from a run saved in the layout
  before run_config.json, its options inside ckpt.pt); another layout is a clear error;
- the full run's output is a Meta checkpoint: written on 2 ranks it runs with example.py on 1 and
  2 ranks with the greedy ids of the TP=1 forward (up to the first near tie);
- a LoRA adapter runs with example_ft.py in both formats, on 1 and 2 ranks;
- a NaN loss stops the run with the last good checkpoint intact.
"""

import json
import math
import sys

import pytest
import torch
from dist_utils import REPO, torchrun
from references import STORIES
from test_ft_main import FAST, LAYOUT_TOL, evals, losses, make_loss_nan_at, to_old_layout

sys.path.insert(0, str(REPO))  # the scripts at the repo root
import example  # noqa: E402
import example_ft  # noqa: E402
import ft_main  # noqa: E402
from llama import files  # noqa: E402
from llama import formats  # noqa: E402
from llama import distributed, lora  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.errors import UserError  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.formats import load  # noqa: E402
from llama.formats import meta  # noqa: E402
from llama.formats import adapters  # noqa: E402
from llama.tuning import train  # noqa: E402

STEPS = ["--max_steps", "5", "--eval_interval", "5"]
LAYOUTS = {"tp2": ["--tp", "2"], "dp2": ["--tp", "1", "--batch_size", "2"]}
LR = {"lora": 3e-3, "full": 1e-3}  # the methods' defaults
# Final weights, TP=N vs TP=1, compared by the update each layout made: |dW_N - dW_1| / |dW_1| per
# tensor (Frobenius norms). Losses agree to fp32 reordering (LAYOUT_TOL), but Adam divides each
# gradient element by its own running RMS, so an element whose gradient is at the rounding level
# (a few per tensor: sums of ~1000 token terms that cancel) moves by up to lr in one layout and not
# the other; one such element of n moves the norm ratio by ~1/sqrt(n) x (its share of the update),
# a few of 256..11008 elements stay well under 1e-2. A missed reduction or a wrong slice changes the
# update's direction: ratio O(1).
UPDATE_TOL = 1e-2
GENERATE = ["--json", "--max_tokens", "24", "--prompt", "Once upon a time"]
INSTRUCT = ["--json", "--max_tokens", "24", "--template", "plain", "--instruction", "Give three tips for staying healthy."]


TARGETS = list(lora.TARGETS)  # the seven block linears and the output layer (column-parallel, gathered)


def run_args(method: str, out) -> list[str]:
    extra = ["--lora_targets", ",".join(TARGETS)] if method == "lora" else []
    return ["--method", method, *FAST, "--template", "plain", *extra, *STEPS, "--out_dir", str(out)]  # plain: 10 held-out examples


def trained_weights(method: str, out_dir, model_dir=None) -> dict[str, torch.Tensor]:
    """Full (unsplit) trained tensors of a run: the LoRA adapter, or the merged Meta shards."""
    if method == "lora":
        return adapters.load_adapter(out_dir / "adapter.pt")[0]
    shards = [files.load_file(p) for p in meta.shard_paths(model_dir or out_dir / "model")]
    return {key: layout.rank_slice(key, [s[key] for s in shards], rank=0, n_ranks=1) for key in shards[0] if key not in layout.NOT_LOADED}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TP=1 runs in this process, then one torchrun: the TP=2 and dp=2 runs, and example.py on 2 ranks
    with the checkpoint the TP=2 full run wrote."""
    root = tmp_path_factory.mktemp("methods")
    for method in LR:
        ft_main.main(run_args(method, root / f"{method}_tp1"))
    jobs = [{"script": "ft_main", "argv": run_args(method, root / f"{method}_{name}") + extra}
            for method in LR for name, extra in LAYOUTS.items()]
    jobs.append({"script": "example", "argv": ["--ckpt_dir", str(root / "full_tp2" / "model"), *GENERATE],
                 "stdout": str(root / "example_2ranks.json")})
    jobs.append({"script": "example_ft", "argv": ["--adapter", str(root / "lora_tp1" / "peft"), *INSTRUCT],
                 "stdout": str(root / "example_ft_2ranks.json")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = torchrun(2, REPO / "tests" / "ft_worker.py", root / "jobs.json", timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def initial_weights() -> dict[str, dict[str, torch.Tensor]]:
    """What the runs start from: the base checkpoint (full), the seeded adapter with B = 0 (lora)."""
    distributed.setup()
    try:
        model = load.load_model(LoadSpec(STORIES, max_seq_len=16, max_batch_size=0, dtype=torch.float32), vocab_size=512,
                                device=torch.device("cpu"))
        lora.add_lora(model, TARGETS, r=8, alpha=16.0, seed=0)  # ft_main's defaults but for the targets
        adapter = lora.gather_state(model)
    finally:
        distributed.teardown()
    return {"lora": adapter, "full": trained_weights("full", None, STORIES)}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("method", list(LR))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_one_rank(runs, initial_weights, method, layout):
    ref_dir, out_dir = runs / f"{method}_tp1", runs / f"{method}_{layout}"
    ref, got = losses(ref_dir), losses(out_dir)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(ref, got):
        assert abs(a - b) < LAYOUT_TOL * abs(a), (ref, got)
    assert len(evals(out_dir)) == 2
    for a, b in zip(evals(ref_dir), evals(out_dir)):
        for key in ("eval_loss", "eval_loss_untuned"):
            assert abs(a[key] - b[key]) < LAYOUT_TOL * abs(a[key]), (key, a, b)
    want, have, start = trained_weights(method, ref_dir), trained_weights(method, out_dir), initial_weights[method]
    assert want.keys() == have.keys() == start.keys()
    for key in want:
        update = (want[key] - start[key]).norm()
        assert update > 0, key  # everything trained
        assert (have[key] - want[key]).norm() < UPDATE_TOL * update, (key, float((have[key] - want[key]).norm() / update))
        assert (have[key] - want[key]).abs().max() < 2 * 5 * LR[method]  # no element beyond Adam's reach


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("method", list(LR))
def test_replicated_tensors_are_bit_identical_across_tp_ranks(runs, method):
    ranks = [torch.load(runs / f"{method}_tp2" / f"rank{r}.pt") for r in range(2)]
    replicated = [name for name in ranks[0] if layout.tensor_split_dim(name) is None]
    split = [name for name in ranks[0] if layout.tensor_split_dim(name) is not None]
    assert replicated and split
    for name in replicated:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    for name in split:  # each rank trained its own slice
        assert not torch.equal(ranks[0][name], ranks[1][name]), name
    if method == "lora":  # A under column-parallel layers, B under row-parallel ones
        assert {"layers.0.attention.wq.lora.A", "layers.0.attention.wo.lora.B", "output.lora.A"} <= set(replicated)


def greedy_with_margins(model_dir, prompt_ids: list[int], n: int, adapter=None) -> tuple[list[int], list[float]]:
    """TP=1 greedy ids from the plain forward (with a LoRA adapter if given), with each step's top1 - top2 margin."""
    distributed.setup()
    try:
        model = load.load_model(LoadSpec(model_dir, max_seq_len=64, max_batch_size=1, dtype=torch.float32), vocab_size=512,
                                device=torch.device("cpu"))
        if adapter is not None:
            full, config = adapters.load_adapter(adapter, model.args)
            lora.load_state(model, full, config["alpha"])
        ids, margins = [], []
        with torch.no_grad():
            for _ in range(n):
                top = model(torch.tensor([prompt_ids + ids]))[0, -1].topk(2)
                ids.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
    finally:
        distributed.teardown()
    return ids, margins


def sure_prefix(margins: list[float]) -> int:
    """Steps before the first near tie. 1 and 2 ranks round the logits (|logit| < 20) differently by
    ~fp32 eps x 20 x a few hundred reordered terms ~ 1e-4; a margin of 1e-3 is safe."""
    return next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))


@pytest.mark.slow
@pytest.mark.dist
def test_full_checkpoint_runs_on_one_two_and_four_ranks(runs, capsys):
    model_dir = runs / "full_tp2" / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and manifest["step"] == 5 and (model_dir / "tokenizer.model").is_file()
    example.main(["--ckpt_dir", str(model_dir), *GENERATE])  # 1 rank reads the 2 shards
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    two = json.loads((runs / "example_2ranks.json").read_text().strip().splitlines()[-1])
    four_run = torchrun(4, REPO / "example.py", "--ckpt_dir", model_dir, *GENERATE, timeout=300)  # each rank half a shard
    assert four_run.returncode == 0, four_run.stderr[-3000:]
    four = json.loads(four_run.stdout.strip().splitlines()[-1])
    ref, margins = greedy_with_margins(model_dir, one["prompt_ids"], len(one["ids"]))
    sure = sure_prefix(margins)
    assert sure >= 8, margins
    assert one["ids"][:sure] == ref[:sure] and two["ids"][:sure] == ref[:sure] and four["ids"][:sure] == ref[:sure]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("method", list(LR))
def test_resume_continues_exactly(runs, tmp_path, method):
    """Stopped after step 3 and resumed: the same losses, evals and weights as the uninterrupted TP=1 run."""
    args = run_args(method, tmp_path)
    ft_main.main([*args[:-4], "--max_steps", "3", "--lr_decay_steps", "5", "--eval_interval", "5", "--out_dir", str(tmp_path)])
    assert train.load_training_state(tmp_path)["step"] == 3
    ft_main.main(["--resume", "--method", method, "--max_steps", "5", "--out_dir", str(tmp_path)])
    whole = runs / f"{method}_tp1"
    assert losses(tmp_path) == losses(whole) and evals(tmp_path) == evals(whole)
    want, have = trained_weights(method, whole), trained_weights(method, tmp_path)
    assert all(torch.equal(want[k], have[k]) for k in want)


@pytest.mark.slow
@pytest.mark.dist
def test_lora_run_saved_in_the_old_layout_resumes_exactly(runs, tmp_path):
    """A LoRA run stopped after step 3 and rewritten as runs were saved before run_config.json (options
    and state in ckpt.pt; the adapter and per-rank optimizer files as they are) resumes and ends with
    the uninterrupted TP=1 run's losses, evals and adapter; the resumed run saves in the new layout."""
    args = run_args("lora", tmp_path)
    ft_main.main([*args[:-4], "--max_steps", "3", "--lr_decay_steps", "5", "--eval_interval", "5", "--out_dir", str(tmp_path)])
    options = to_old_layout(tmp_path)
    assert options["method"] == "lora" and options["lora_targets"] == ",".join(TARGETS)
    assert not (tmp_path / "run_config.json").exists() and not (tmp_path / "state.pt").exists()
    ft_main.main(["--resume", "--method", "lora", "--max_steps", "5", "--out_dir", str(tmp_path)])
    whole = runs / "lora_tp1"
    assert losses(tmp_path) == losses(whole) and evals(tmp_path) == evals(whole)
    want, have = trained_weights("lora", whole), trained_weights("lora", tmp_path)
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert (tmp_path / "run_config.json").is_file() and (tmp_path / "state.pt").is_file() and not (tmp_path / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.dist
def test_activation_checkpointing_gives_the_same_run(runs, tmp_path):
    ft_main.main([*run_args("full", tmp_path), "--checkpoint_activations"])
    assert losses(tmp_path) == losses(runs / "full_tp1")  # recomputation repeats the same fp32 ops


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_it_learns(tmp_path, method):
    """30 steps with the method's defaults on the bundled data (plain template, 128 tokens)."""
    ft_main.main(["--method", method, "--template", "plain", "--max_seq_len", "128", "--max_steps", "30", "--eval_interval", "30",
                  "--warmup_steps", "5", "--out_dir", str(tmp_path)])
    records = evals(tmp_path)
    untuned, last = records[0]["eval_loss_untuned"], records[-1]["eval_loss"]
    # Measured: untuned 4.015 (perplexity 55.4); after 30 steps LoRA r=8 3.31, full 3.16 (perplexity 27 and 23),
    # against 3.73 for the soft prompt (test_ft_main.py).
    assert records[-1]["step"] == 30 and last < untuned - 0.4, (untuned, last)
    assert all(math.isfinite(loss) for _, loss in losses(tmp_path))


@pytest.mark.slow
@pytest.mark.dist
def test_lora_adapter_runs_in_both_formats_on_one_and_two_ranks(runs, capsys):
    outputs = {}
    for name, extra in {"project": ["--adapter", str(runs / "lora_tp1" / "adapter.pt")],
                        "peft": ["--adapter", str(runs / "lora_tp1" / "peft")], "none": ["--no_adapter"]}.items():
        example_ft.main([*INSTRUCT, *extra])
        outputs[name] = json.loads(capsys.readouterr().out.strip())
    assert outputs["project"]["ids"] == outputs["peft"]["ids"]
    two = json.loads((runs / "example_ft_2ranks.json").read_text().strip())
    ref, margins = greedy_with_margins(STORIES, outputs["peft"]["prompt_ids"], len(two["ids"]), runs / "lora_tp1" / "adapter.pt")
    sure = sure_prefix(margins)
    assert sure >= 8, margins
    assert outputs["peft"]["ids"][:sure] == two["ids"][:sure] == ref[:sure]  # each rank holds its slices of the adapter
    assert outputs["none"]["ids"] != ref


def test_bad_method_options_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown LoRA target"):
        ft_main.main(["--method", "lora", "--lora_targets", "wq,q_proj", "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--lora_rank must be at least 1"):
        ft_main.main(["--method", "lora", "--lora_rank", "0", "--out_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.dist
def test_planner_per_card_terms_match_the_runs(runs):
    """lora/full per-card numbers for N=2 and ZeRO's moments for D=2, from what the runs held and wrote."""
    from llama.formats import plan

    args = formats.open_checkpoint(STORIES).args
    for method, count in {"lora": plan.lora_parameter_count(args, 2, 8, TARGETS), "full": plan.weight_bytes(args, 2, 1)}.items():
        for rank in range(2):
            held = torch.load(runs / f"{method}_tp2" / f"rank{rank}.pt")
            assert sum(t.numel() for t in held.values()) == count, (method, rank)
    shards = [files.load_file(runs / "full_dp2" / f"optimizer.00.{d:02d}.pt")["optimizer"]["state"] for d in range(2)]
    moments = [sum(t.nbytes for s in shard.values() for name, t in s.items() if name != "step") for shard in shards]
    params = plan.weight_bytes(args, 1, 1)
    assert sum(moments) == 8 * params  # every parameter's two moments, on exactly one rank
    largest = max(a * b for a, b in (s for s in layout.full_shapes(args).values() if len(s) == 2))
    assert all(abs(m - 8 * params // 2) <= 8 * largest for m in moments)  # ZeRO balances by whole tensors


def test_diverging_lora_run_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The 3rd step's loss is made NaN: the run stops there; step 2's adapter and checkpoint stay intact."""
    make_loss_nan_at(monkeypatch, 3)
    with pytest.raises(UserError, match=r"training diverged at step 3: loss nan.*last good checkpoint is .*state.pt \(step 2"):
        ft_main.main(["--method", "lora", *FAST, "--max_steps", "5", "--ckpt_interval", "1", "--out_dir", str(tmp_path)])
    assert train.load_training_state(tmp_path)["step"] == 2
    full, config = adapters.load_adapter(tmp_path / "adapter.pt")
    assert config["step"] == 2 and all(torch.isfinite(t).all() for t in full.values())
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("method,layout,message", [
    ("lora", "tp2", "world size 1 is not a multiple of --tp 2"),  # --tp is kept from the run
    ("full", "dp2", "the run used 1 tensor-parallel x 2 data-parallel ranks, this job has 1 x 1: resume with the same layout"),
])
@pytest.mark.slow
@pytest.mark.dist
def test_resume_on_another_layout_is_one_clear_error(runs, method, layout, message):
    """Per-rank optimizer states need the run's layout (ZeRO shards over dp); nothing is written."""
    out_dir = runs / f"{method}_{layout}"
    before = sorted(p.name for p in out_dir.iterdir())
    with pytest.raises(UserError, match=message):
        ft_main.main(["--resume", "--method", method, "--max_steps", "6", "--out_dir", str(out_dir)])
    assert sorted(p.name for p in out_dir.iterdir()) == before
