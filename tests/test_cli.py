"""example.py as a user runs it: --json output vs llama2.c's golden ids (1 process and 2 TP
ranks), and bad input -> one `error:` line, non-zero exit, no traceback, nothing on stdout.

Each good run is a fresh interpreter (~3 s of imports), so they start together on a 2-thread pool
when the module's first test asks for them; each test waits for its own. The bad inputs are refused
before any work: they run in this process, through the script's run_cli as its process would.
"""

import json
import re
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import pytest
from dist_utils import REPO, in_process, python, torchrun
from references import GOLDEN, LLAMA2_TOKENIZER, STORIES

DEFAULT_PROMPTS = {GOLDEN[name]["prompt"]: GOLDEN[name] for name in ("greedy_prompt_once_upon_a_time", "greedy_prompt_lily_park")}
LONG_PROMPT = "Once upon a time there was a little girl who loved to play in the park with her dog"


# name -> (example.py arguments, regex the one error line must match); {tmp} is a scratch dir
# holding a model dir without params.json and one without shards.
BAD_INPUTS = {
    "missing params.json": (("--ckpt_dir", "{tmp}/no_params"), r"needs params\.json \(Meta layout\) or config\.json"),
    "missing shards": (("--ckpt_dir", "{tmp}/no_shards"), r"no consolidated\.NN\.pth shards"),
    "missing tokenizer": (("--tokenizer_path", "{tmp}/tok.model"), r"tokenizer .*tok\.model not found"),
    "vocab mismatch": (("--tokenizer_path", str(LLAMA2_TOKENIZER)), r"tokenizer has 32000 tokens but params\.json says vocab_size 512"),
    "prompt too long": (("--max_seq_len", "16", "--prompt", LONG_PROMPT), r"the prompt has \d+ tokens but --max_seq_len is 16"),
    "unknown dtype": (("--dtype", "float64"), r"unknown dtype 'float64'"),
    "unknown prepack": (("--prepack", "fast"), r"--prepack must be one of auto, none, onednn, mkl, got 'fast'"),
    "a file for a folder": (("--ckpt_dir", "ckpts/stories260K/params.json"), r"params\.json is a file, not a model directory"),
    "system without chat": (("--system", "Be brief."), r"--system is the system prompt of --chat: add --chat"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Future]]:
    tmp = tmp_path_factory.mktemp("cli")
    for directory, files in (("no_params", ["consolidated.00.pth", "tokenizer.model"]), ("no_shards", ["params.json", "tokenizer.model"])):
        (tmp / directory).mkdir()
        for name in files:
            shutil.copy(STORIES / name, tmp / directory / name)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            "json": pool.submit(python, "example.py", "--json"),
            "json tp2": pool.submit(torchrun, 2, "example.py", "--json"),
            "tp3": pool.submit(torchrun, 3, "example.py", "--json"),
        }
        for name, (args, _) in BAD_INPUTS.items():  # refused before any work: in this process, while the runs above go on
            futures[name] = Future()
            futures[name].set_result(in_process("example.py", *(arg.format(tmp=tmp) for arg in args)))
        yield futures


def check_json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == list(DEFAULT_PROMPTS)
    for line in lines:
        golden = DEFAULT_PROMPTS[line["prompt"]]
        assert set(line) == {"prompt", "prompt_ids", "ids", "text"}
        assert line["prompt_ids"] == golden["prompt_ids"]
        assert line["ids"] == golden["generated_ids"][:64], "default --max_tokens 64, greedy"
        assert golden["text"].startswith(line["prompt"] + line["text"])
    return lines


@pytest.mark.slow
def test_json_output_matches_golden(runs):
    check_json_lines(runs["json"].result())


@pytest.mark.slow
def test_json_output_on_two_ranks_is_the_same(runs):
    """Only rank 0 prints, and 2 tensor-parallel ranks give the same lines as one process."""
    assert check_json_lines(runs["json tp2"].result()) == check_json_lines(runs["json"].result())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_clear_error(runs, name: str):
    result = runs[name].result()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout == "", "nothing may be printed before the error"
    (line,) = error_lines(result.stderr)
    assert re.search(BAD_INPUTS[name][1], line), line


@pytest.mark.slow
def test_tp_size_that_does_not_divide_the_heads(runs):
    """stories260K has 4 kv heads: 3 ranks is one error line (rank 0 only) naming the sizes and
    the rank counts that work. torchrun itself then reports the failed workers (its own traceback)."""
    result = runs["tp3"].result()
    assert result.returncode != 0
    (line,) = error_lines(result.stderr)
    assert "n_kv_heads=4" in line and "[1, 2, 4]" in line, line
    assert not re.search(r'File ".*(example\.py|/llama/)', result.stderr), "a worker printed a traceback"
    assert result.stdout == ""


@pytest.mark.slow
def test_a_closed_stdout_ends_the_run_quietly():
    """`python example.py --json | head -1`: the reader goes away after one line; the run ends with
    exit 0 and no traceback (it used to be a BrokenPipeError traceback and exit 1)."""
    import os
    import subprocess
    import sys

    prompts = [arg for p in ("Once upon a time", "The cat", "A dog", "Lily") for arg in ("--prompt", p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one cache row: the prompts run one after another, so the later lines are written after the reader left
    proc = subprocess.Popen([sys.executable, "example.py", "--json", "--max_tokens", "100", "--max_batch_size", "1", *prompts], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith('{"prompt": "Once upon a time"')
    proc.stdout.close()  # as `head -1` exits
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
