"""The training loss on vocabulary-split logits: no rank ever holds [tokens, vocab] for the whole vocabulary.

The vocabulary head is a column-parallel linear (llama/parallel.py): rank r computes the logits
of vocabulary rows [r V/N, (r+1) V/N). Gathering them before the cross-entropy (what generation
does) costs every rank the whole [tokens, V] float32 block, N times its share. Megatron's and
fairscale's vocabulary-parallel cross-entropy needs only three all-reduces of [tokens] vectors:
the max logit (for a stable exp), the sum of exp over each slice, and the target's logit, which
only the rank owning that vocabulary row contributes; the gradient is softmax - one_hot on each
rank's own slice, so the backward needs no collective beyond the one the column-parallel layer
already does on its input.

fairscale's `vocab_parallel_cross_entropy` is that function and is used as is. It accumulates in
the logits' dtype, so they are made float32 first (as the gathered loss does), and it has no
ignore index: a target outside every rank's slice (IGNORE_INDEX = -100) gets log-sum-exp as its
loss and softmax as its gradient. `vocab_parallel_loss` therefore zeroes those rows' losses, and
a zeroed row passes a zero gradient back (fairscale multiplies its saved softmax by the incoming
gradient), so ignored positions add nothing, as in F.cross_entropy.
"""

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy

from llama.tuning.data import IGNORE_INDEX
from llama.parallel import ColumnParallelLinear


def tensor_parallel_size() -> int:
    """Ranks the vocabulary is split over (1 when no model-parallel group is set up)."""
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def vocab_parallel_loss(local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of targets [N] given this rank's float32 logit slice [N, V/tp].

    Every rank of the tensor-parallel group returns the same sum; IGNORE_INDEX targets add 0.
    `local_logits` is overwritten (fairscale subtracts the max in place), so pass a fresh tensor.
    """
    losses = vocab_parallel_cross_entropy(local_logits, targets)
    return losses.masked_fill(targets == IGNORE_INDEX, 0.0).sum()


def chunk_loss(output: ColumnParallelLinear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk of hidden states [N, dim] against targets [N].

    One rank: float32 logits and F.cross_entropy. Several: each rank's vocabulary slice and
    `vocab_parallel_loss`, so no logits are gathered.
    """
    if tensor_parallel_size() == 1:
        return F.cross_entropy(output(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    # fresh logits whatever the dtype: no autograd node keeps a linear's (or a sum's) output, so
    # fairscale may overwrite them in place without a copy
    return vocab_parallel_loss(output.split_forward(hidden).float(), targets)


def chunk_token_losses(output: ColumnParallelLinear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] of one chunk (chunk_loss before its sum); IGNORE_INDEX targets give 0.

    Sequence log-probabilities (DPO, llama/tuning/dpo.py) need each token's loss to sum it per
    sequence; the vocabulary-parallel path is the same as chunk_loss's, so no logits are gathered.
    """
    if tensor_parallel_size() == 1:
        return F.cross_entropy(output(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    losses = vocab_parallel_cross_entropy(output.split_forward(hidden).float(), targets)
    return losses.masked_fill(targets == IGNORE_INDEX, 0.0)
