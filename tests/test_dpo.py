"""llama/tuning/dpo.py against code this project did not write: TRL 1.16's DPOTrainer, torch's log_softmax, TRL's fused LM head.

- Losses, rewards and metrics: TRL's own `DPOTrainer._compute_loss` runs on the same per-token
  log-probabilities, given through the smallest stand-ins it needs (a "model" returning those
  log-probabilities, precomputed reference log-probabilities, an accelerator that gathers nothing).
  TRL sums the per-token values per row exactly as we do, so the inputs are bit-identical and the
  losses must be too. TRL 1.16's "sigmoid" ignores label_smoothing; conservative DPO is checked
  against the same expression in TRL's "aot" loss, which equals it for a single pair.
- sequence_logps: F.log_softmax of the gathered logits on one rank, TRL's fused LM head on a tiny
  transformers Llama, and 2 tensor-parallel ranks (tests/dpo_worker.py) against one.

Tolerances come from float32 (eps = 2^-23) and the accumulation lengths, as in
tests/test_vocab_parallel_loss.py; each is stated where it is used.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, torchrun
from dpo_worker import CHUNK, DIM, N_PAIRS, ROW_WEIGHTS, VOCAB, pair_logps, problem

from llama.errors import UserError
from llama.parallel import ColumnParallelLinear
from llama.tuning import dpo
from llama.tuning.data import IGNORE_INDEX

EPS = torch.finfo(torch.float32).eps
LN2 = torch.tensor(math.log(2.0), dtype=torch.float32)  # ln 2 rounded once to float32


# ---- TRL's DPOTrainer._compute_loss on given per-token log-probabilities ------------------------


def trl_loss(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             loss_type: str, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """TRL's loss and train metrics for one batch [2B rows: chosen, then rejected], from per-token log-probs [2B, T-1]."""
    from trl import DPOTrainer

    gather = staticmethod(lambda tensor: tensor)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=gather),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, args=SimpleNamespace())
    zeros = torch.zeros_like(per_token)

    def model(**kwargs):  # what a model patched by trl's add_fused_lm_head returns
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def batch(n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """completion_mask [2B, T] (prompts and responses of varied lengths), labels, per-token log-probs [2B, T-1], reference logps."""
    gen = torch.Generator().manual_seed(seed)
    width = 16
    mask = torch.zeros(2 * n_pairs, width, dtype=torch.long)
    for row in range(2 * n_pairs):
        start = int(torch.randint(1, 6, (), generator=gen))
        mask[row, start : start + int(torch.randint(1, width - start + 1, (), generator=gen))] = 1
    labels = torch.randint(0, 100, mask.shape, generator=gen).masked_fill(mask == 0, IGNORE_INDEX)
    per_token = (-torch.rand(2 * n_pairs, width - 1, generator=gen) * 4).masked_fill(mask[:, 1:] == 0, 0.0)
    reference = per_token.sum(dim=1) + torch.randn(2 * n_pairs, generator=gen) * 3  # a reference a few nats away
    return mask, labels, per_token, reference[:n_pairs], reference[n_pairs:]


def ours(per_token, labels, ref_chosen, ref_rejected, loss_type, beta, label_smoothing=0.0):
    logps = per_token.sum(dim=1)  # TRL's own reduction: the same tensor, the same sum
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = dpo.response_lengths(labels).chunk(2)
    out = dpo.preference_losses(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                chosen_lengths=n_chosen, rejected_lengths=n_rejected)
    return out, chosen, rejected


def pair_slice(tensors, i: int, n_pairs: int):
    """Pair i alone: its chosen and rejected rows of the [2B, ...] tensors, its entries of the [B] ones."""
    return [t[[i, n_pairs + i]] if t.size(0) == 2 * n_pairs else t[i : i + 1] for t in tensors]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_losses_equal_trl_pair_by_pair(loss_type: str, beta: float) -> None:
    """Bit for bit: each pair alone, and the batch mean (TRL returns only the mean); IPO's per-token normalisation included."""
    n = 6
    mask, labels, per_token, ref_c, ref_r = batch(n, seed=0)
    (losses, _, _), _, _ = ours(per_token, labels, ref_c, ref_r, loss_type, beta)
    for i in range(n):
        m, lab, pt, rc, rr = pair_slice([mask, labels, per_token, ref_c, ref_r], i, n)
        (loss_i, _, _), _, _ = ours(pt, lab, rc, rr, loss_type, beta)
        assert torch.equal(trl_loss(pt, m, rc, rr, loss_type, beta)[0], loss_i[0]) and torch.equal(loss_i[0], losses[i])
    assert torch.equal(trl_loss(per_token, mask, ref_c, ref_r, loss_type, beta)[0], losses.mean())


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rewards_and_metrics_equal_trl(loss_type: str) -> None:
    """TRL's train metrics: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.

    TRL takes float32 means of B values; ours are float64 sums divided by B, so they differ by the
    float32 mean's rounding: at most B eps times the largest |value| (B additions, then the division).
    """
    n = 8
    mask, labels, per_token, ref_c, ref_r = batch(n, seed=1)
    (losses, rc, rr), chosen, rejected = ours(per_token, labels, ref_c, ref_r, loss_type, 0.1)
    metrics = dpo.pair_metrics(losses, rc, rr, chosen, rejected)
    _, theirs = trl_loss(per_token, mask, ref_c, ref_r, loss_type, 0.1)
    assert 0 < metrics["rewards/accuracies"] < 1  # both outcomes occur, so accuracies is a real check
    scale = max(t.abs().max().item() for t in (losses, rc, rr, rc - rr, chosen, rejected))
    for name in dpo.METRICS[1:]:
        assert metrics[name] == pytest.approx(theirs[name], abs=n * EPS * scale), name
    assert metrics["loss"] == pytest.approx(losses.mean().item(), abs=n * EPS * scale)
    assert torch.equal(rc, 0.1 * (chosen - ref_c)) and torch.equal(rr, 0.1 * (rejected - ref_r))


def test_conservative_dpo_equals_trls_smoothed_expression() -> None:
    """cDPO: TRL 1.16's "aot" loss applies -(1-e) logsig(b d) - e logsig(-b d) to sorted log-ratios, which for one
    pair is cDPO itself. It forms d as (pc - pr) - (rc - rr) where we (and TRL's sigmoid) take (pc - rc) - (pr - rr):
    the two differ by the rounding of three float32 subtractions of values up to M = max|logp|, <= 4 M eps, and
    the loss (1-Lipschitz in b d) by b times that, plus a few ulps of the loss itself."""
    n = 6
    mask, labels, per_token, ref_c, ref_r = batch(n, seed=2)
    beta, smoothing = 0.1, 0.2
    (losses, _, _), chosen, rejected = ours(per_token, labels, ref_c, ref_r, "sigmoid", beta, smoothing)
    big = max(t.abs().max().item() for t in (chosen, rejected, ref_c, ref_r))
    for i in range(n):
        m, lab, pt, rc, rr = pair_slice([mask, labels, per_token, ref_c, ref_r], i, n)
        theirs, _ = trl_loss(pt, m, rc, rr, "aot", beta, smoothing)
        assert abs(theirs.item() - losses[i].item()) <= beta * 4 * big * EPS + 4 * EPS * theirs.item()
    (plain, _, _), _, _ = ours(per_token, labels, ref_c, ref_r, "sigmoid", beta)
    assert not torch.allclose(plain, losses)  # smoothing changes the loss ...
    # ... while TRL 1.16's own "sigmoid" ignores label_smoothing (documented in llama/tuning/dpo.py)
    assert torch.equal(trl_loss(per_token, mask, ref_c, ref_r, "sigmoid", beta, smoothing)[0], plain.mean())


def test_policy_equal_to_reference() -> None:
    """Step 0: sigmoid loss ln 2 exactly (float32), rewards 0, accuracy 0 (TRL counts strictly greater);
    cDPO ln 2 within its (1 - e) + e rounding (2 ulps); IPO (0 - 1 / (2 beta))^2 = 25 at beta 0.1, exactly."""
    logps = -torch.rand(5) * 30
    other = -torch.rand(5) * 30
    losses, rc, rr = dpo.preference_losses(logps, other, logps, other, loss_type="sigmoid", beta=0.1)
    assert torch.equal(losses, LN2.expand(5)) and not rc.any() and not rr.any()
    metrics = dpo.pair_metrics(losses, rc, rr, logps, other)
    assert metrics["loss"] == LN2.item() and metrics["rewards/accuracies"] == 0 and metrics["rewards/margins"] == 0
    smoothed, _, _ = dpo.preference_losses(logps, other, logps, other, loss_type="sigmoid", beta=0.1, label_smoothing=0.3)
    assert (smoothed - LN2).abs().max() <= 2 * EPS * LN2
    lengths = torch.tensor([3, 1, 7, 2, 9])
    ipo, _, _ = dpo.preference_losses(logps, other, logps, other, loss_type="ipo", beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths)
    assert torch.equal(ipo, torch.full((5,), 25.0))


def test_metric_sums_add_over_micro_batches() -> None:
    """Sums of micro-batches (and of ranks, all-reduced) give the mean over all pairs, each pair weighted equally."""
    pc, pr, rc, rr = pair_logps()
    whole = dpo.pair_metrics(*dpo.preference_losses(pc, pr, rc, rr), pc, pr, prefix="eval_")
    sums = sum(dpo.metric_sums(*dpo.preference_losses(*(t[s] for t in (pc, pr, rc, rr))), pc[s], pr[s])
               for s in (slice(0, 2), slice(2, 3), slice(3, None)))  # micro-batches of 2, 1 and 4 pairs
    parts = dpo.metric_means(sums, prefix="eval_")
    assert list(parts) == [f"eval_{name}" for name in dpo.METRICS] and sums[-1] == N_PAIRS
    assert parts == pytest.approx(whole, rel=1e-12)  # float64 sums in another order


def test_config_is_checked_and_frozen() -> None:
    config = dpo.DPOConfig()
    assert (config.loss, config.beta, config.label_smoothing) == ("sigmoid", 0.1, 0.0)
    with pytest.raises(AttributeError):
        config.beta = 1.0
    assert dpo.DPOConfig("ipo", 0.5).loss == "ipo" and dpo.DPOConfig(label_smoothing=0.1).label_smoothing == 0.1
    for kwargs, message in [({"loss": "hinge"}, "unknown DPO loss 'hinge'"), ({"beta": 0}, "beta 0 must be a finite number above 0"),
                            ({"beta": float("inf")}, "beta inf"), ({"beta": -1.0}, "beta -1.0"),
                            ({"label_smoothing": 0.5}, r"label_smoothing 0.5 must be in \[0, 0.5\)"),
                            ({"label_smoothing": -0.1}, "label_smoothing -0.1"),
                            ({"loss": "ipo", "label_smoothing": 0.1}, "the ipo loss does not take it")]:
        with pytest.raises(UserError, match=message):
            dpo.DPOConfig(**kwargs)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo.preference_losses(*pair_logps(), loss_type="ipo")


# ---- sequence_logps ---------------------------------------------------------------------------


def head(weight: torch.Tensor) -> ColumnParallelLinear:
    output = ColumnParallelLinear(weight.size(1), weight.size(0))
    output.weight.data.copy_(weight)
    return output


def direct_logps(weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook computation: gathered logits, log_softmax, the label's entry, summed over labelled positions."""
    logp = F.log_softmax(hidden[:, :-1] @ weight.T, dim=-1)
    targets = labels[:, 1:]
    token = logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * (targets != IGNORE_INDEX)).sum(dim=1)


def token_tolerance(weight: torch.Tensor, hidden: torch.Tensor, n_sum_terms: int) -> float:
    """Per-token |difference| of two float32 log-probabilities computed in different orders:
    each logit is a DIM-term dot product (rounding <= DIM eps sum|h||w| per side, so <= 2 DIM eps L between
    sides, moving logsumexp and the label's logit by as much: 4 DIM eps L); the normaliser sums n_sum_terms
    positive terms (<= n eps relative per side, so 2 n eps in the log); exp/log add a few ulps of |logit|."""
    L = (hidden.abs().reshape(-1, hidden.size(-1)) @ weight.abs().T).max().item()
    return (4 * weight.size(1) * L + 2 * n_sum_terms + 8 * L) * EPS


def test_sequence_logps_equal_log_softmax_on_gathered_logits(world1) -> None:
    """One rank, every chunking: the direct computation; rows without labels give exactly 0; gradients reach hidden and head."""
    weight, hidden, labels = problem()
    want = direct_logps(weight, hidden, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    # a row sums n tokens, each within token_tolerance; the row sum rounds within n eps |logp| on each side
    tol = n_tokens * token_tolerance(weight, hidden, VOCAB) + 2 * n_tokens * EPS * want.abs()
    for chunk in (1, CHUNK, 1000):
        output = head(weight)
        h = hidden.clone().requires_grad_(True)
        got = dpo.sequence_logps(output, h, labels, chunk)
        assert got.dtype == torch.float32 and ((got - want).abs() <= tol).all(), (chunk, got, want)
        assert got[4] == 0.0  # no label in row 4
        got.sum().backward()
        assert h.grad.abs().sum() > 0 and output.weight.grad.abs().sum() > 0
        assert not h.grad[4].any() and not h.grad[:, -1].any()  # no label: no gradient; the last position predicts nothing


def test_sequence_logps_equal_trl_fused_lm_head(world1) -> None:
    """A tiny transformers Llama: TRL's add_fused_lm_head log-probs summed per row equal ours on its hidden states and lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    _, _, labels = problem()
    input_ids = labels.clamp(min=0)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state
        add_fused_lm_head(model)
        theirs = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)
        got = dpo.sequence_logps(head(model.lm_head.weight), hidden, labels, CHUNK)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    tol = n_tokens * token_tolerance(model.lm_head.weight, hidden, VOCAB) + 2 * n_tokens * EPS * theirs.abs()
    assert ((got - theirs).abs() <= tol).all(), (got, theirs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    result = torchrun(2, REPO / "tests" / "dpo_worker.py", out, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return {kind: [torch.load(out / f"{kind}_rank{r}.pt") for r in range(2)] for kind in ("tp2", "dp2")}


@pytest.mark.slow
@pytest.mark.dist
def test_two_tensor_parallel_ranks_equal_one(ranks, world1) -> None:
    """TP=2 (each rank its half of the vocabulary, nothing gathered) equals TP=1: values, hidden and head gradients.

    Both ranks hold the identical result (all-reduced per-token values, one fixed summation order).
    Values: per token token_tolerance (the normaliser sums V/2 terms per rank + the all-reduce vs V
    terms), n per row, plus the row sums' rounding. Gradients: d logp / d logits = onehot - softmax,
    whose softmax differs by <= the per-token tolerance (relative); the hidden gradient sums V such
    terms times W (and its GEMM rounds within 2 V eps max|W|), scaled by the row's weight; a head
    gradient row sums the N tokens' (onehot - p) h, within (per-token tol + N eps) sum |w_row| max|h|.
    """
    weight, hidden, labels = problem()
    output = head(weight)
    h = hidden.clone().requires_grad_(True)
    one = dpo.sequence_logps(output, h, labels, CHUNK)
    (ROW_WEIGHTS * one).sum().backward()
    per_token = token_tolerance(weight, hidden, VOCAB)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    value_tol = n_tokens * per_token + 2 * n_tokens * EPS * one.abs().detach()
    hidden_tol = ROW_WEIGHTS.abs().max() * (2 * per_token + 2 * VOCAB * EPS) * weight.abs().max()
    n = int(n_tokens.sum())
    weight_tol = (per_token + n * EPS) * (ROW_WEIGHTS.abs().max() * n) * hidden.abs().max()
    tp = ranks["tp2"]
    assert torch.equal(tp[0]["logps"], tp[1]["logps"])  # identical on every tensor-parallel rank
    for r, rank in enumerate(tp):
        assert ((rank["logps"] - one.detach()).abs() <= value_tol).all(), (rank["logps"], one)
        assert (rank["hidden_grad"] - h.grad).abs().max() <= hidden_tol, r
        rows = VOCAB // 2
        assert (rank["weight_grad"] - output.weight.grad[r * rows : (r + 1) * rows]).abs().max() <= weight_tol, r
    assert h.grad.abs().max() > 100 * hidden_tol  # the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.dist
def test_metrics_summed_over_data_parallel_ranks(ranks) -> None:
    """Two data-parallel ranks, each with its share of the pairs, all-reduce the sums: the means are over all pairs."""
    pc, pr, rc, rr = pair_logps()
    want = dpo.metric_sums(*dpo.preference_losses(pc, pr, rc, rr), pc, pr)
    for rank in ranks["dp2"]:
        assert rank["sums"][-1] == N_PAIRS
        assert dpo.metric_means(rank["sums"]) == pytest.approx(dpo.metric_means(want), rel=1e-12)  # float64, another order
