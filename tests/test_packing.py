"""Sequence packing (`ft_main.py --pack`, llama/tuning/packing.py) on the bundled stories260K and alpaca data (fp32, CPU).

- the rows: every example exactly once and whole, positions restarting at 0, a label-free first
  slot per example, a block-diagonal causal mask, data-parallel ranks cutting the same rows;
- exactness: the summed loss and every trained tensor's gradient of packed rows equal those of
  the same examples one per row, for prompt, LoRA and full tuning, on 1 rank and on TP=2
  (tests/packing_worker.py); the held-out loss is the same packed and padded, with and without
  the soft prompt;
- a packed LoRA run lowers the held-out loss; a packed run resumed after step 2 repeats the
  uninterrupted one exactly;
- bad input: --pack with --group_by_length, an example longer than a row, too few rows for a batch.
"""

import math
import re
import sys

import pytest
import torch
from dist_utils import REPO, python, torchrun
from packing_worker import METHODS, run_all
from test_ft_main import evals, losses

sys.path.insert(0, str(REPO))  # the scripts at the repo root
import ft_main  # noqa: E402
from llama.errors import UserError  # noqa: E402
from llama.tuning import packing, train  # noqa: E402
from llama.tuning.data import IGNORE_INDEX, Example  # noqa: E402

# Packed vs padded, relative to the magnitude compared (the loss; a gradient tensor's largest element).
# Both sides do the same arithmetic on the same numbers in other orders: projections of a row of T
# slots instead of one example (GEMM blocking over 64- and 172-term dot products), attention over the
# row's keys (masked ones weigh exactly 0) instead of the example's, ~540 token losses summed in other
# chunks, and backward sums over those tokens. A reordered fp32 sum of n terms moves by ~sqrt(n) ulps
# typically (n/2 at worst): ~23 for n = 540, through 5 layers ~5 x 23 ~ 120 ulps, rounded up to
# 2^8 eps = 3.1e-5. Attention that crosses examples moves the loss by >20% (checked by hand with the
# plain causal mask).
PACK_TOL = 2**8 * torch.finfo(torch.float32).eps
# The learning runs: LoRA on the whole English set, packed rows of 256 stories260K tokens.
LEARN = ["--method", "lora", "--pack", "--template", "plain", "--max_seq_len", "256", "--batch_size", "4", "--warmup_steps", "3",
         "--eval_batches", "3"]


def example(n: int, prompt: int = 2) -> Example:
    ids = list(range(1, n + 1))
    return Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def test_rows_hold_every_example_whole_and_fit():
    lengths = [5, 17, 3, 30, 12, 12, 1, 29, 8]
    rows = packing.pack_rows(lengths, 30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 30 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 30)  # 117 slots: 4 rows is the least possible, and best-fit finds it


def test_collated_row_restarts_positions_and_masks_each_example():
    ids, labels, layout = packing.collate_rows([[example(4), example(3)], [example(5)]], pad_id=0, n_virtual=2)
    assert ids.shape == (2, 11)  # the longer row: 2 + 4 + 2 + 3 slots
    assert layout.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert layout.virtual[0].tolist() == [0, 1, -1, -1, -1, -1, 0, 1, -1, -1, -1]
    assert ids[0].tolist() == [0, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3]
    # virtual slots and each example's first token carry no label: no target crosses into an example
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [3, 4] + [IGNORE_INDEX] * 4 + [3]
    assert layout.documents[1].tolist() == [0] * 7 + [1] * 4  # the padding is an example of its own
    assert layout.positions[1].tolist() == [*range(7), *range(4)]
    mask = layout.attention_mask()[:, 0]
    docs = layout.documents
    for b in range(2):
        for i in range(11):
            assert mask[b, i].tolist() == [bool(docs[b, j] == docs[b, i] and j <= i) for j in range(11)]
    assert train.count_label_tokens(labels) == 2 + 1 + 3  # the unpacked count: labels after position 0


def test_data_parallel_ranks_cut_the_same_rows():
    lengths = [(7 * i) % 23 + 1 for i in range(60)]
    whole = packing.epoch_rows(lengths, 24, 4, seed=0, epoch=1)
    parts = [packing.epoch_rows(lengths, 24, 2, seed=0, epoch=1, dp_rank=r, dp_size=2) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == whole
    assert whole != packing.epoch_rows(lengths, 24, 4, seed=0, epoch=2)  # reshuffled and repacked each epoch


def assert_packed_equals_padded(result: dict, where: str) -> None:
    padded, packed = result["padded"], result["packed"]
    assert result["rows"] < 12 / 2, where  # the rows really hold several examples each
    assert packed["labels"] == padded["labels"], where
    assert abs(packed["loss"] - padded["loss"]) <= PACK_TOL * abs(padded["loss"]), where
    assert padded["grads"].keys() == packed["grads"].keys()
    for name, want in padded["grads"].items():
        assert want.abs().max() > 0, (where, name)
        assert (packed["grads"][name] - want).abs().max() <= PACK_TOL * want.abs().max(), (where, name)
    for key in ("", "bare_"):
        want = result["eval"][f"{key}padded"]
        assert abs(result["eval"][f"{key}packed"] - want) <= PACK_TOL * want, (where, key)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack1")
    run_all(out)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack2")
    result = torchrun(2, REPO / "tests" / "packing_worker.py", out, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_padded_on_one_rank(one_rank, method):
    assert_packed_equals_padded(torch.load(one_rank / f"{method}_rank0.pt"), method)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_padded_on_two_tensor_parallel_ranks(two_ranks, one_rank, method):
    for rank in range(2):
        result = torch.load(two_ranks / f"{method}_rank{rank}.pt")
        assert_packed_equals_padded(result, f"{method} rank {rank}")
        one = torch.load(one_rank / f"{method}_rank0.pt")  # and the split model gives the 1-rank loss
        assert abs(result["packed"]["loss"] - one["packed"]["loss"]) <= PACK_TOL * abs(one["packed"]["loss"])


@pytest.mark.slow
def test_packed_run_learns(tmp_path, capsys):
    ft_main.main([*LEARN, "--max_steps", "20", "--eval_interval", "20", "--out_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    truncated = int(re.search(r"(\d+) truncated to max_seq_len", printed).group(1))
    assert truncated > 0 and "packing: rows of 256 slots" in printed  # examples longer than a row are cut, as unpacked
    records = evals(tmp_path)
    untuned, last = records[0]["eval_loss_untuned"], records[-1]["eval_loss"]
    # Measured: untuned 3.906; after 20 steps 3.328 packed, 3.345 for the same run padded (4 examples a step;
    # at 256 tokens most stories260K examples fill a row alone, so the packed run sees only a few more).
    assert records[-1]["step"] == 20 and last < untuned - 0.4, (untuned, last)


@pytest.mark.slow
def test_packed_resume_continues_exactly(tmp_path):
    args = [*LEARN, "--max_examples", "300", "--eval_interval", "2", "--ckpt_interval", "2"]
    ft_main.main([*args, "--max_steps", "4", "--out_dir", str(tmp_path / "whole")])
    ft_main.main([*args, "--max_steps", "2", "--lr_decay_steps", "4", "--out_dir", str(tmp_path / "split")])
    ft_main.main(["--resume", "--max_steps", "4", "--out_dir", str(tmp_path / "split")])
    assert [s for s, _ in losses(tmp_path / "split")] == [1, 2, 3, 4]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and evals(tmp_path / "split") == evals(tmp_path / "whole")


@pytest.mark.slow
def test_pack_with_group_by_length_is_one_clear_error(tmp_path):
    result = python("ft_main.py", "--pack", "--group_by_length", "--out_dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --pack and --group_by_length exclude each other: packing already fills "
                                                  "rows with whole examples; drop one"]
    assert not (tmp_path / "out").exists()


def test_rows_that_cannot_hold_an_example_or_fill_a_batch_are_clear_errors():
    with pytest.raises(UserError, match="an example of 31 slots does not fit a packed row of 30; raise --max_seq_len"):
        packing.pack_rows([5, 31], 30)
    with pytest.raises(UserError, match="3 training examples pack into 1 rows of 30 slots, which cannot fill one batch of 2 rows"):
        packing.epoch_rows([5, 6, 7], 30, 2, seed=0, epoch=0)
