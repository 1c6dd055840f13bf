"""The planner's lora and full terms against what the code allocates (one process, CPU).

Saved activations are counted with autograd's saved-tensor hooks (storages counted once, the
frozen weights and the RoPE table left out), as tests/test_split_model.py does for prompt tuning.
The per-card adapter, weight and optimizer-state terms for N = 2 and D = 2 are checked in
tests/test_ft_methods.py against the files the TP=2 and dp=2 runs wrote.
"""

from dataclasses import replace

import pytest
import torch
from references import STORIES

from llama import lora
from llama.formats import layout, params, plan
from llama.model import ModelArgs, Transformer

# A model wide enough that per-token scalars (RMSNorm's rsqrt, attention's logsumexp) and the
# S x S mask the formulas leave out stay below a few percent of the total.
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=256, multiple_of=32, max_seq_len=64, max_batch_size=2)
BATCH, SEQ = 2, 48


def build(dtype: torch.dtype):
    """ARGS with random weights in `dtype`, frozen, with a RoPE table and no KV cache (as training loads it)."""
    with torch.device("meta"):
        model = Transformer(ARGS)
    state = layout.random_state_dict(ARGS, seed=1, dtype=dtype)
    model.load_state_dict({k: v for k, v in state.items() if k not in layout.NOT_LOADED}, assign=True)
    model.requires_grad_(False)
    model.setup_caches(0, SEQ)
    return model.train()


def saved_bytes_of(forward, skip) -> int:
    """Bytes of the distinct storages autograd keeps while `forward` runs (tensors in `skip` not counted)."""
    skip = {t.untyped_storage().data_ptr() for t in skip}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def saved_bytes(model, skip=()) -> int:
    """Bytes of the distinct storages autograd keeps for a forward to the final norm."""
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return saved_bytes_of(lambda: model.hidden_states(tokens), [*skip, model.rope])


def test_lora_terms(world1):
    """16-bit activations (the CUDA case the planner is for); float32 shares more storages."""
    dtype = torch.bfloat16
    model = build(dtype)
    frozen = list(model.parameters())
    lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=8, alpha=16.0)
    adapters = list(lora.local_state(model).values())
    assert sum(p.numel() for p in adapters) == plan.lora_parameter_count(ARGS, 1, 8)
    tokens, b = BATCH * SEQ, dtype.itemsize
    predicted = plan.saved_for_backward_bytes(ARGS, 1, tokens, b) + plan.lora_saved_bytes(ARGS, 1, tokens=tokens, dtype_bytes=b, r=8)
    assert saved_bytes(model, skip=[*frozen, *adapters]) == pytest.approx(predicted, rel=0.05)


def test_full_terms(world1):
    """Activations in 16 bits (CUDA autocast computes in --dtype); master weights, gradients, AdamW in float32."""
    model = build(torch.bfloat16).requires_grad_(True)
    tokens = BATCH * SEQ
    predicted = plan.saved_for_backward_bytes(ARGS, 1, tokens, 2) + plan.full_saved_bytes(ARGS, 1, tokens, 2)
    assert saved_bytes(model, skip=list(model.parameters())) == pytest.approx(predicted, rel=0.05)
    params = list(build(torch.float32).requires_grad_(True).parameters())
    assert sum(p.numel() for p in params) == plan.weight_bytes(ARGS, 1, 1)
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state + sum(p.grad.nbytes for p in params) == plan.train_state_bytes(ARGS, 1, plan.Workload("full"))


def test_checkpointing_keeps_block_inputs(world1):
    model = build(torch.float32).requires_grad_(True)
    model.activation_checkpointing = True
    tokens = BATCH * SEQ
    # with checkpointing, the forward keeps each block's input and the final norm's tensors
    kept = saved_bytes(model, skip=list(model.parameters()))
    predicted = ARGS.n_layers * tokens * ARGS.dim * 4
    assert predicted <= kept <= predicted + 3 * tokens * ARGS.dim * 4
    full = plan.Workload("full", BATCH, SEQ, 4)
    assert plan.activation_bytes(ARGS, 1, replace(full, checkpoint_activations=True)) < plan.activation_bytes(ARGS, 1, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_lora_checkpointing_keeps_block_inputs(world1, dtype):
    """LoRA + --checkpoint_activations: the forward keeps each block's input (the planner's L*T*d*b)
    and the final norm's tensors; the adapters, recomputed with their block, keep nothing outside it,
    so the bound is the one full fine-tuning meets. The planner's lora estimate drops accordingly."""
    model = build(dtype)
    frozen = list(model.parameters())
    lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=8, alpha=16.0)
    adapters = list(lora.local_state(model).values())
    tokens, b = BATCH * SEQ, dtype.itemsize
    unchecked = saved_bytes(model, skip=[*frozen, *adapters])
    model.activation_checkpointing = True
    kept = saved_bytes(model, skip=[*frozen, *adapters])
    predicted = ARGS.n_layers * tokens * ARGS.dim * b
    # the final norm keeps its float32 input (a copy in 16 bits) and its normed output: at most 3 T*d*4 on top
    assert predicted <= kept <= predicted + 3 * tokens * ARGS.dim * 4, (predicted, kept)
    assert kept < unchecked / 2  # the adapters' inputs and the blocks' activations are gone
    work = plan.Workload("lora", BATCH, SEQ, b)
    assert plan.activation_bytes(ARGS, 1, replace(work, checkpoint_activations=True)) < plan.activation_bytes(ARGS, 1, work)


def test_full_memory_warning_and_plan_cli(capsys):
    import split_model
    from llama.config import LoadSpec
    from llama.distributed import Parallel
    from llama.tuning.config import TrainConfig
    from llama.tuning.methods import memory_warning

    config = TrainConfig(model=LoadSpec(max_seq_len=512, max_batch_size=0, dtype=torch.bfloat16), method="full", batch_size=8)
    seven_b = params.model_args({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256}, 32000)
    parallel = Parallel(rank=0, world_size=2, tp_rank=0, tp_size=2, dp_rank=0, dp_size=1, device=torch.device("cuda"))
    warning = memory_warning(config, seven_b, parallel, 24 * plan.GiB)
    assert warning.startswith("the planner puts --method full at ") and "but a card has 24.0 GiB" in warning
    assert memory_warning(config, seven_b, parallel, 200 * plan.GiB) is None
    split_model.main(["--plan", "--ckpt_dir", str(STORIES), "--mode", "lora", "--lora_rank", "4"])
    out = capsys.readouterr().out
    assert "lora, float16" in out and "LoRA r=4" in out and "grad+opt" in out
