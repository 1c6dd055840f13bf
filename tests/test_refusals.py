"""The CLIs refuse what would lose work and validate what is nonsense, as a new user meets them.

Each bad case is one `error:` line (no traceback), exit code 2, and nothing written or replaced.
The runs that do work are fresh interpreters started together on a 2-thread pool (as in test_cli.py);
the bad cases, refused before any work, run in this process through each script's run_cli.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, free_port, in_process, python
from references import STORIES

# name -> (script, arguments, regex of the one error line); {tmp} is the module's scratch folder.
BAD = {
    "temperature below 0": ("example.py", ("--temperature", "-1"), r"temperature must be 0 \(greedy\) or above"),
    "top_p 0": ("example.py", ("--top_p", "0", "--temperature", "1"), r"top_p must be in \(0, 1\]"),
    "top_p above 1": ("example.py", ("--top_p", "1.5"), r"top_p must be in \(0, 1\]"),
    "max_tokens 0": ("example.py", ("--max_tokens", "0"), r"--max_tokens must be at least 1"),
    "lr nan": ("ft_main.py", ("--lr", "nan", "--out_dir", "{tmp}/lr"), r"--lr must be in \(0, 1\]"),
    "lr 0": ("ft_main.py", ("--lr", "0", "--out_dir", "{tmp}/lr"), r"--lr must be in \(0, 1\]"),
    "lr 1e38": ("ft_main.py", ("--lr", "1e38", "--out_dir", "{tmp}/lr"), r"--lr must be in \(0, 1\]"),
    "num_shards 0": ("split_model.py", ("--ckpt_dir", "{tmp}/model", "--num_shards", "0"), r"--num_shards must be at least 1"),
    "num_shards -2": ("split_model.py", ("--ckpt_dir", "{tmp}/model", "--num_shards", "-2"), r"--num_shards must be at least 1"),
    "earlier run": ("ft_main.py", ("--out_dir", "{tmp}/earlier", "--max_steps", "1"),
                    r"holds an earlier run .*pass --resume to continue it, --force to start over"),
    "resume and force": ("ft_main.py", ("--out_dir", "{tmp}/earlier", "--resume", "--force"), r"pass one of them"),
}
# An earlier run's files: run_config.json + state.pt, and the ckpt.pt of a run saved before run_config.json existed.
EARLIER = {"run_config.json": b'{"method": "lora"}\n', "state.pt": b"an earlier run's training state", "ckpt.pt": b"an older run's checkpoint",
           "metrics.jsonl": b'{"step": 1}\n', "adapter.pt": b"an adapter"}


def with_env(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def random_adapter(path: Path, rank: int = 2) -> Path:
    """A LoRA adapter for stories260K's wq (dim 64, 5 layers) with nonzero B, so merging changes the weights."""
    from llama.formats.adapters import save_adapter

    gen = torch.Generator().manual_seed(0)
    full = {}
    for i in range(5):
        full[f"layers.{i}.attention.wq.lora.A"] = torch.randn(rank, 64, generator=gen)
        full[f"layers.{i}.attention.wq.lora.B"] = torch.randn(64, rank, generator=gen)
    return save_adapter(full, {"rank": rank, "alpha": 4.0, "targets": ["wq"]}, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    shutil.copytree(STORIES, tmp / "model")
    (tmp / "earlier").mkdir()
    for name, content in EARLIER.items():
        (tmp / "earlier" / name).write_bytes(content)
    shutil.copytree(tmp / "earlier", tmp / "forced")
    adapter = random_adapter(tmp / "adapter.pt")
    port = str(free_port())
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        futures["master_addr"] = pool.submit(with_env, "example.py", "--json", "--max_tokens", "4", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        futures["help"] = pool.submit(python, "example.py", "--help")
        # a merged split and a plain split of the same model on a fresh folder: two default names
        futures["merge"] = pool.submit(python, "split_model.py", "--ckpt_dir", tmp / "model", "--adapter", adapter, "--num_shards", "2")
        futures["split"] = pool.submit(python, "split_model.py", "--ckpt_dir", tmp / "model", "--num_shards", "2")
        futures["forced"] = pool.submit(python, "ft_main.py", "--method", "lora", "--out_dir", tmp / "forced", "--force", "--max_steps", "1",
                                        "--max_examples", "40", "--batch_size", "2", "--eval_batches", "1", "--max_seq_len", "128")
        # the bad cases are refused before any work: in this process (through each script's run_cli), while the runs above go on
        refused = {name: in_process(script, *(a.format(tmp=tmp) for a in args)) for name, (script, args, _) in BAD.items()}
        yield tmp, {**refused, **{name: future.result() for name, future in futures.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_and_nothing_is_written(runs, name):
    tmp, results = runs
    result = results[name]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(BAD[name][2], line), line
    assert not (tmp / "lr").exists() and not (tmp / "model_mp0").exists()


@pytest.mark.slow
def test_an_earlier_run_is_kept_without_resume_or_force(runs):
    tmp, _ = runs
    assert {p.name: p.read_bytes() for p in (tmp / "earlier").iterdir()} == EARLIER


@pytest.mark.slow
def test_force_starts_over(runs):
    tmp, results = runs
    assert results["forced"].returncode == 0, results["forced"].stderr[-3000:]
    saved = torch.load(tmp / "forced" / "state.pt", weights_only=True)
    assert saved["step"] == 1 and (tmp / "forced" / "adapter.pt").read_bytes() != EARLIER["adapter.pt"]
    assert (tmp / "forced" / "metrics.jsonl").read_bytes() != EARLIER["metrics.jsonl"]
    assert json.loads((tmp / "forced" / "run_config.json").read_text())["max_steps"] == 1
    assert not (tmp / "forced" / "ckpt.pt").exists()  # the older run's file went with the rest


@pytest.mark.slow
def test_merged_output_has_its_own_default_folder(runs):
    tmp, results = runs
    for name in ("merge", "split"):
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    merged, plain = tmp / "model_merged_mp2", tmp / "model_mp2"
    assert (merged / "manifest.json").is_file() and (plain / "manifest.json").is_file()
    a = torch.load(merged / "consolidated.00.pth", weights_only=True)["layers.0.attention.wq.weight"]
    b = torch.load(plain / "consolidated.00.pth", weights_only=True)["layers.0.attention.wq.weight"]
    assert not torch.equal(a, b), "the merged folder holds the adapted weights"


@pytest.mark.slow
def test_exported_master_addr_does_not_make_a_plain_run_distributed(runs):
    _, results = runs
    result = results["master_addr"]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.slow
def test_help_shows_defaults(runs):
    _, results = runs
    out = results["help"].stdout
    assert results["help"].returncode == 0
    assert "(default: 64)" in out and "(default: ckpts/stories260K)" in out and "Meta or Hugging Face model directory" in out
    # a default is said once: not "(default: None)" after a help text that already says it
    assert "(default: None)" not in out and "(default: False)" not in out
    assert not re.search(r"default:[^()]*\(default:", out.replace("\n", " "))


def test_compile_says_it_is_compiling(world1, capsys):
    from references import load_stories

    from llama.generation import Llama
    from llama.tokenizer import load_tokenizer

    Llama(load_stories(), load_tokenizer(STORIES / "tokenizer.model"), world1, compile=True)
    assert "compiling" in capsys.readouterr().err
