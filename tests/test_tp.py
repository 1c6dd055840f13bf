"""Tensor parallelism under torchrun (gloo, CPU): TP=2 and TP=4 equal TP=1, and an M-shard
checkpoint loads on N ranks for M, N in {1, 2, 4} with the same logits.

One torchrun launch of 4 processes (tests/tp_worker.py) runs every checkpoint at TP=4 and at
TP=2 (two replicas of 2); this process computes TP=1 and compares. Models: the bundled
stories260K and a random Llama-2-style config (GQA 8:4, ffn_dim_multiplier, rope_theta, and
`vocab_size: -1` filled from the tokenizer), each written as 1, 2 and 4 shards.
"""

import json
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun
from references import REPO, STORIES, STORIES_TOKENIZER
from tp_worker import outputs

from llama.formats import layout, params
from llama.tokenizer import load_tokenizer

LLAMA2_STYLE_PARAMS = {
    "dim": 128, "n_layers": 3, "n_heads": 8, "n_kv_heads": 4, "vocab_size": -1, "multiple_of": 64,
    "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
}
MODELS = ["stories260K", "llama2-style"]
SHARD_COUNTS = [1, 2, 4]
TP_SIZES, WORLD = [4, 2], 4
# float32: TP changes only the summation order of the all-reduced partial sums. Logits are
# compared as |TP=N - TP=1| <= 1e-5 + 1e-5 * |TP=1|: 1e-5 absolute alone is ~2 float32 ulps at
# the largest logits (~19); the largest difference measured is 1.1e-5 at a logit of 3.8.
TOL = dict(rtol=1e-5, atol=1e-5)


def write_checkpoint(directory: Path, params: dict, state: dict, n_shards: int) -> Path:
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        torch.save(layout.shard_state_dict(state, rank, n_shards), directory / f"consolidated.{rank:02d}.pth")
    return directory


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """(model, shard count) -> checkpoint directory."""
    root = tmp_path_factory.mktemp("tp_ckpts")
    stories_params = params.read_params(STORIES / "params.json")
    stories_state = torch.load(STORIES / "consolidated.00.pth", weights_only=True, mmap=True)
    random_state = layout.random_state_dict(params.model_args(LLAMA2_STYLE_PARAMS, 512), seed=0)
    dirs = {("stories260K", 1): STORIES}
    for n in SHARD_COUNTS:
        if n > 1:
            dirs["stories260K", n] = write_checkpoint(root / f"stories260K-{n}", stories_params, stories_state, n)
        dirs["llama2-style", n] = write_checkpoint(root / f"llama2-style-{n}", LLAMA2_STYLE_PARAMS, random_state, n)
    return dirs


@pytest.fixture(scope="module")
def worker_outputs(ckpt_dirs, tmp_path_factory) -> dict[tuple[str, int, int, int], dict]:
    """(model, shard count, TP size, global rank) -> the worker's outputs, from one launch."""
    out = tmp_path_factory.mktemp("tp_out")
    tp_arg = ",".join(map(str, TP_SIZES))
    generate = [path for (_, n), path in ckpt_dirs.items() if n == 1]
    logits_only = [path for (_, n), path in ckpt_dirs.items() if n > 1]
    result = torchrun(
        WORLD, REPO / "tests" / "tp_worker.py", "--out", out, "--tp", tp_arg, "--tokenizer", STORIES_TOKENIZER,
        "--generate", *generate, "--logits_only", *logits_only, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return {
        (model, n, tp, rank): torch.load(out / f"{path.name}.tp{tp}.rank{rank}.pt", weights_only=True)
        for (model, n), path in ckpt_dirs.items()
        for tp in TP_SIZES
        for rank in range(WORLD)
    }


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("model", MODELS)
def test_tp_equals_tp1(world1, model: str, ckpt_dirs, worker_outputs):
    """1-shard checkpoint on 2 and 4 ranks: logits within ATOL, greedy and sampled ids identical; six
    requests (three prompts greedy and sampled, each with its seed) generated together on 2 cache rows
    give on every rank the ids each gives alone on one rank."""
    reference = outputs(ckpt_dirs[model, 1], load_tokenizer(STORIES_TOKENIZER), world1, rows=1)
    assert sum(map(len, reference["greedy"])) >= 16, "too few ids to compare"
    for tp in TP_SIZES:
        for rank in range(WORLD):
            got = worker_outputs[model, 1, tp, rank]
            where = f"{model} TP={tp} rank {rank}"
            torch.testing.assert_close(got["logits"], reference["logits"], **TOL, msg=lambda m: f"{where}: {m}")
            assert got["greedy"] == reference["greedy"], where
            assert got["sampled"] == reference["sampled"], f"{where}: ranks must sample the same tokens as one rank"
            assert got["queued"] == reference["queued"], f"{where}: prompts queued on 2 rows must give their ids alone"
    assert reference["sampled"] != reference["greedy"], "sampling at temperature 1 should leave the greedy path"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("model", MODELS)
def test_m_shards_on_n_ranks(world1, model: str, ckpt_dirs, worker_outputs):
    """1->2, 1->4, 2->1, 2->2, 2->4, 4->1, 4->2, 4->4 all give the logits of the 1-shard checkpoint on 1 rank."""
    tokenizer = load_tokenizer(STORIES_TOKENIZER)
    reference = outputs(ckpt_dirs[model, 1], tokenizer, world1, generate=False)["logits"]
    for n_shards in SHARD_COUNTS:
        if n_shards > 1:
            one_rank = outputs(ckpt_dirs[model, n_shards], tokenizer, world1, generate=False)["logits"]
            torch.testing.assert_close(one_rank, reference, **TOL, msg=lambda m: f"{model} {n_shards}->1: {m}")
        for tp in TP_SIZES:
            for rank in range(WORLD):
                got = worker_outputs[model, n_shards, tp, rank]["logits"]
                torch.testing.assert_close(got, reference, **TOL, msg=lambda m: f"{model} {n_shards}->{tp} rank {rank}: {m}")
