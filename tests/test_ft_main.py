"""ft_main.py end to end on the bundled stories260K and alpaca_en_demo.json (fp32, CPU).

- it learns: the held-out loss falls clearly below the untuned model's, and the tuned prompt
  changes greedy output (example_ft.py, both adapter formats);
- resume: a run stopped after step k and resumed reproduces the uninterrupted run exactly, also
  from a run saved in the layout before run_config.json (its options inside ckpt.pt);
- TP=2 and dp=2 (torchrun, gloo) match TP=1: same losses and final prompt within LAYOUT_TOL (fp32 reordering), and the
  replicated prompt (and its gradient) is bit-identical on every rank;
- bad input stops with one clear error: --resume without a checkpoint, a diverging loss (the last
  good checkpoint stays intact), an adapter for another model width.
"""

import json
import math
import sys

import pytest
import torch
from dist_utils import REPO, in_process, python, torchrun

sys.path.insert(0, str(REPO))  # the scripts at the repo root
import example_ft  # noqa: E402
import ft_main  # noqa: E402
from llama.errors import UserError  # noqa: E402
from llama.tuning import train  # noqa: E402
from llama.tuning.prompt import load_prompt  # noqa: E402

# Small, fast runs: 200 records, short sequences, a few steps.
FAST = ["--max_examples", "200", "--max_seq_len", "128", "--n_virtual_tokens", "8", "--batch_size", "4", "--warmup_steps", "2",
        "--eval_batches", "2"]
# The learning run: 30 steps of batch 8 on the whole English set (913 train / 49 held out). The plain
# template leaves more of the 128 tokens to the response, the part that is learned and evaluated.
LEARN = ["--template", "plain", "--max_seq_len", "128", "--lr", "0.1", "--max_steps", "30", "--eval_interval", "15", "--warmup_steps", "5"]


# Relative tolerance between layouts (TP=1 vs TP=2 vs dp=2) of the same fp32 run. Each layout sums the
# same numbers in a different order: 64- and 172-wide dot products split over ranks, ~1000 token losses
# per step split over data-parallel ranks, partial results all-reduced, and under TP the loss's
# 512-term sum of exp split over the vocabulary slices (llama/tuning/loss.py). One reordered fp32 sum of n
# terms differs by at most ~n/2 ulps of its magnitude in the worst case and ~sqrt(n) typically; with
# n ~ 1000 that is ~32 ulps per step, ~23 more for the vocabulary sum, and 5 Adam steps feed each
# step's difference into the next (Adam's update is a ratio of moments, so relative differences carry
# over, not shrink): 5 x 55 ~ 275 ulps, rounded up to 2^9 x fp32 eps (1.19e-7) = 6.1e-5 relative. A
# real bug (a missed all-reduce, a wrong slice) moves the loss by >1e-3 relative.
LAYOUT_TOL = 2**9 * torch.finfo(torch.float32).eps


def losses(out_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train.read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def evals(out_dir) -> list[dict]:
    return [r for r in train.read_metrics(out_dir / "metrics.jsonl") if "eval_loss" in r]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One 30-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("learn")
    ft_main.main([*LEARN, "--out_dir", str(out)])
    return out


@pytest.mark.slow
def test_it_learns(learned):
    records = evals(learned)
    untuned, first, last = records[0]["eval_loss_untuned"], records[0]["eval_loss"], records[-1]["eval_loss"]
    # Measured: untuned model 4.015 (perplexity 55.4), text-initialised prompt 4.019 at step 0, 3.764 at
    # step 15, 3.733 after 30 steps (perplexity 41.8): 0.28 nats below the untuned model.
    assert records[-1]["step"] == 30
    assert last < untuned - 0.1, (untuned, first, last)
    assert records[-1]["eval_ppl"] == pytest.approx(math.exp(last))
    assert all(math.isfinite(loss) for _, loss in losses(learned))
    assert (learned / "prompt.pt").is_file() and (learned / "peft" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_tuned_prompt_changes_greedy_output(learned, capsys):
    common = ["--json", "--max_tokens", "24", "--template", "plain", "--instruction", "Give three tips for staying healthy."]
    outputs = {}
    for name, extra in {"project": ["--adapter", str(learned / "prompt.pt")], "peft": ["--adapter", str(learned / "peft")],
                        "none": ["--no_adapter"]}.items():
        example_ft.main([*common, *extra])
        outputs[name] = json.loads(capsys.readouterr().out.strip())["ids"]
    assert outputs["project"] == outputs["peft"]  # both formats hold the same prompt
    assert outputs["project"] != outputs["none"]


RESUME = [*FAST, "--eval_interval", "2", "--ckpt_interval", "2"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted 6-step run the resumed ones are compared with."""
    out = tmp_path_factory.mktemp("whole")
    ft_main.main([*RESUME, "--max_steps", "6", "--out_dir", str(out)])
    return out


def stopped_after_3(out_dir) -> None:
    """The first half of `whole`: "killed" after step 3 (its schedule still decays over 6 steps)."""
    ft_main.main([*RESUME, "--max_steps", "3", "--lr_decay_steps", "6", "--out_dir", str(out_dir)])
    assert train.load_training_state(out_dir)["step"] == 3
    assert sorted(p.name for p in out_dir.glob("*.*")) == ["metrics.jsonl", "prompt.pt", "run_config.json", "state.pt"]


def assert_continues_as(out_dir, whole) -> None:
    assert [s for s, _ in losses(out_dir)] == [1, 2, 3, 4, 5, 6]
    assert losses(out_dir) == losses(whole)  # exact: fp32 on CPU, same batches, optimizer and RNG state
    assert evals(out_dir) == evals(whole)
    assert torch.equal(load_prompt(out_dir / "prompt.pt").weight, load_prompt(whole / "prompt.pt").weight)


@pytest.mark.slow
def test_resume_continues_exactly(whole, tmp_path):
    stopped_after_3(tmp_path)
    ft_main.main(["--resume", "--max_steps", "6", "--out_dir", str(tmp_path)])
    assert_continues_as(tmp_path, whole)


def to_old_layout(out_dir) -> dict:
    """Rewrite a run's run_config.json + state.pt as ft_main.py saved runs before run_config.json existed:
    one ckpt.pt holding the training state and, under "config", `vars(args)` of its resolved options
    (flat, as the parser left them: paths, dtype and --quantize as text, --lora_targets comma-separated,
    the dtype and tokenizer path resolved, --resume/--force included). Returns that dict."""
    saved = json.loads((out_dir / "run_config.json").read_text())
    spec = saved.pop("model")
    del spec["max_batch_size"]  # ft_main.py had no --max_batch_size
    field_map = saved["field_map"]
    options = {**spec, "quantize": spec["quantize"] or "none", **saved, "lora_targets": ",".join(saved["lora_targets"]),
               "field_map": None if field_map is None else ",".join(f"{k}={v}" for k, v in field_map.items()),
               "resume": False, "force": False}
    state = torch.load(out_dir / "state.pt", weights_only=True)
    assert "config" not in state
    torch.save({**state, "config": options}, out_dir / "ckpt.pt")
    (out_dir / "state.pt").unlink()
    (out_dir / "run_config.json").unlink()
    return options


@pytest.mark.slow
def test_run_saved_in_the_old_layout_resumes_exactly(whole, tmp_path):
    """A run whose options live in ckpt.pt (no run_config.json, no state.pt) resumes and continues as the
    uninterrupted run; its next checkpoint is written in the new layout, and ckpt.pt goes."""
    stopped_after_3(tmp_path)
    options = to_old_layout(tmp_path)
    assert options["dtype"] == "float32" and options["lr"] == 0.03 and options["max_examples"] == 200
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["ckpt.pt", "metrics.jsonl", "prompt.pt"]
    with pytest.raises(UserError, match="--lr 0.1 differs from the saved run's 0.03"):  # its options are read, and kept
        ft_main.main(["--resume", "--lr", "0.1", "--out_dir", str(tmp_path)])
    ft_main.main(["--resume", "--max_steps", "6", "--out_dir", str(tmp_path)])
    assert_continues_as(tmp_path, whole)
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["metrics.jsonl", "prompt.pt", "run_config.json", "state.pt"]
    assert train.load_training_state(tmp_path)["step"] == 6


@pytest.mark.slow
def test_resume_keeps_options(learned):
    with pytest.raises(UserError, match="--lr 0.03 differs from the saved run's 0.1"):
        ft_main.main(["--resume", "--lr", "0.03", "--out_dir", str(learned)])


@pytest.mark.slow
def test_resuming_a_finished_run_says_there_is_nothing_to_do(learned, capsys):
    before = (learned / "metrics.jsonl").read_text()
    assert ft_main.main(["--resume", "--out_dir", str(learned)]) is None
    assert f"nothing to do: the run in {learned} finished at step 30 (--max_steps 30)" in capsys.readouterr().out
    assert (learned / "metrics.jsonl").read_text() == before, "no evaluation was run again"


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint(tmp_path):
    """SIGINT after the first checkpoint: one line naming state.pt, its step and the command that continues; exit 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*FAST, "--max_steps", "100000", "--ckpt_interval", "2", "--eval_interval", "100000", "--out_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "ft_main.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # the state is written; let the run go on training
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    last = stderr.strip().splitlines()[-1]
    step = train.load_training_state(tmp_path)["step"]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert last == (f"interrupted: the last checkpoint is {tmp_path / 'state.pt'} (step {step}); "
                    f"continue with --resume --out_dir {tmp_path}"), last


@pytest.mark.slow
def test_resume_without_checkpoint_is_one_clear_error(tmp_path):
    result = in_process("ft_main.py", "--resume", "--out_dir", tmp_path / "none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --resume: no training state at {tmp_path / 'none' / 'state.pt'}; "
                                                  "start without --resume, or pass the --out_dir of the run to continue"]


def make_loss_nan_at(monkeypatch, step: int) -> None:
    """The `step`-th loss computed (one micro-batch a step in these runs) becomes NaN."""
    real, calls = train.summed_loss, []

    def nan_at_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * math.nan if len(calls) == step else loss

    monkeypatch.setattr(train, "summed_loss", nan_at_step)


def test_diverging_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    """A hook makes the 3rd step's loss NaN; the run must stop there, leaving step 2's checkpoint intact."""
    make_loss_nan_at(monkeypatch, 3)
    with pytest.raises(UserError, match=r"training diverged at step 3: loss nan.*last good checkpoint is .*state.pt \(step 2"):
        ft_main.main([*FAST, "--max_steps", "5", "--ckpt_interval", "1", "--out_dir", str(tmp_path)])
    saved = train.load_training_state(tmp_path)
    assert saved["step"] == 2 and torch.isfinite(saved["prompt"]).all()
    assert torch.equal(load_prompt(tmp_path / "prompt.pt").weight, saved["prompt"])
    assert [step for step, _ in losses(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # no half-written file


@pytest.mark.slow
def test_adapter_of_another_width_is_one_clear_error(tmp_path):
    from llama.tuning.prompt import SoftPrompt, save_prompt

    save_prompt(SoftPrompt(torch.zeros(4, 768)), tmp_path / "wide.pt")
    result = python("example_ft.py", "--adapter", tmp_path / "wide.pt", "--max_tokens", "4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: adapter {tmp_path / 'wide.pt'} has embedding dim 768 but the model "
                                                  "has dim 64: use an adapter trained for this model"]
    assert result.stdout == ""


@pytest.mark.slow
@pytest.mark.dist
def test_tensor_and_data_parallel_match_one_rank(tmp_path):
    """5 steps on 1 rank vs TP=2 (model split, same batches) and dp=2 (2 x half batches), 2 processes each."""
    args = [*FAST, "--template", "plain", "--max_steps", "5", "--eval_interval", "5"]  # plain: 10 held-out examples
    one = python("ft_main.py", *args, "--out_dir", tmp_path / "tp1")
    assert one.returncode == 0, one.stderr[-3000:]
    for name, extra in {"tp2": ["--tp", "2"], "dp2": ["--tp", "1", "--batch_size", "2"]}.items():
        out = tmp_path / name
        run = torchrun(2, REPO / "tests" / "prompt_tune_worker.py", *args, *extra, "--out_dir", out, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        assert torch.equal(ranks[0]["grad"], ranks[1]["grad"]), name  # the replicated prompt gets one gradient
        assert ranks[0]["grad"].abs().sum() > 0
        assert torch.equal(ranks[0]["prompt"], ranks[1]["prompt"]), name  # ... and stays identical
        ref, got = losses(tmp_path / "tp1"), losses(out)
        assert [s for s, _ in got] == [1, 2, 3, 4, 5]
        for (_, a), (_, b) in zip(ref, got):
            assert abs(a - b) < LAYOUT_TOL * abs(a), (name, ref, got)
        assert len(evals(out)) == len(evals(tmp_path / "tp1")) == 2  # step 0 and step 5
        for a, b in zip(evals(tmp_path / "tp1"), evals(out)):
            for key in ("eval_loss", "eval_loss_untuned"):
                assert abs(a[key] - b[key]) < LAYOUT_TOL * abs(a[key]), (name, key, a, b)
        tp1_prompt = load_prompt(tmp_path / "tp1" / "prompt.pt").weight
        assert (tp1_prompt - ranks[0]["prompt"]).abs().max() < LAYOUT_TOL * tp1_prompt.abs().max(), name
