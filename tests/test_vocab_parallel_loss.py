"""The vocabulary-parallel loss (llama/tuning/loss.py) equals torch's cross-entropy on gathered logits, TP=2 and TP=4.

One torchrun launch of 4 processes runs tests/vocab_loss_worker.py: each rank holds its slice of
a 512-row head in the project's column-parallel layer and computes each chunk's summed loss with
no logits gathered. The reference is F.cross_entropy on the full logits in this process. The
per-chunk losses, the gradient of the hidden states and each rank's slice of the weight gradient
must match, and a chunk whose labels are all IGNORE_INDEX must give exactly 0 loss and 0 gradient.
"""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, torchrun
from vocab_loss_worker import CHUNK, DIM, VOCAB, problem

from llama.tuning.data import IGNORE_INDEX

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_loss")
    result = torchrun(4, REPO / "tests" / "vocab_loss_worker.py", out, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return {tp: [torch.load(out / f"tp{tp}_rank{r}.pt") for r in range(4)] for tp in (2, 4)}


@pytest.fixture(scope="module")
def reference():
    """Per-chunk summed losses and gradients of torch's cross-entropy on the gathered [N, V] logits."""
    weight, hidden, targets = problem()
    weight, hidden = weight.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    logits = hidden @ weight.T
    losses = torch.stack([F.cross_entropy(lg, t, ignore_index=IGNORE_INDEX, reduction="sum")
                          for lg, t in zip(logits.split(CHUNK), targets.split(CHUNK))])
    losses.sum().backward()
    return {"losses": losses.detach(), "hidden_grad": hidden.grad, "weight_grad": weight.grad, "hidden": hidden.detach(),
            "weight": weight.detach(), "targets": targets}


# Tolerances, from fp32 accumulation lengths (eps = 2^-23). A token's loss is log(sum_v exp(l_v - max)) - l_t:
# the two sides add the same V positive terms in different orders (TP: V/tp per rank, then the all-reduce),
# so the sums differ by at most ~V eps relative, i.e. V eps absolute in the log; the logits themselves are
# 64-term dot products (64 eps of |l| <= 16, ~1e3 eps) rounded alike on both sides. A chunk of CHUNK tokens
# adds CHUNK such errors: CHUNK x (V + 2^10) eps ~ 0.03 on a chunk loss ~ 100; dropping a rank's slice or
# the wrong target logit moves a chunk loss by O(1) per token.
LOSS_TOL = CHUNK * (VOCAB + 2**10) * EPS
# d loss / d logits = softmax - one_hot differs by <= V eps per element (the normaliser); the hidden gradient
# sums V of them times |W| (plus the TP all-reduce of tp partial sums), <= 2 V eps max|W| x sum|p - y| <= 4 V eps max|W|.
# A weight-gradient element sums N tokens' (p - y) h: <= (N + 2V) eps sum_n |h_n|.


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 4])
def test_loss_equals_gathered_cross_entropy(ranks, reference, tp):
    for r, rank in enumerate(ranks[tp]):
        assert (rank["losses"] - reference["losses"]).abs().max() < LOSS_TOL, (tp, r, rank["losses"], reference["losses"])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 4])
def test_chunk_of_ignored_labels_adds_exactly_nothing(ranks, tp):
    for rank in ranks[tp]:
        assert rank["losses"][2] == 0.0  # chunk 2: every target is IGNORE_INDEX
        assert torch.equal(rank["hidden_grad"][2 * CHUNK : 3 * CHUNK], torch.zeros(CHUNK, DIM))
    # ... while the other chunks carry loss
    assert (torch.cat([ranks[tp][0]["losses"][:2], ranks[tp][0]["losses"][3:]]) > 0).all()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 4])
def test_gradients_equal_gathered_cross_entropy(ranks, reference, tp):
    weight, hidden, targets = reference["weight"], reference["hidden"], reference["targets"]
    n = int((targets != IGNORE_INDEX).sum())
    hidden_tol = 4 * VOCAB * EPS * weight.abs().max()
    weight_tol = (n + 2 * VOCAB) * EPS * hidden.abs().max(dim=1).values.sum()
    rows = VOCAB // tp
    for r, rank in enumerate(ranks[tp]):
        assert (rank["hidden_grad"] - reference["hidden_grad"]).abs().max() < hidden_tol, (tp, r)
        tp_rank = r % tp  # fairscale: ranks 0..tp-1 are the first tensor-parallel group
        ref = reference["weight_grad"][tp_rank * rows : (tp_rank + 1) * rows]
        assert (rank["weight_grad"] - ref).abs().max() < weight_tol, (tp, r)
    assert reference["hidden_grad"].abs().max() > 100 * hidden_tol  # the comparison is not vacuous
