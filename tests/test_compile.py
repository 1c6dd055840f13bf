"""torch.compile'd decoding (`--compile`, llama.runner.Runner) gives eager's tokens.

On CPU the runner compiles `decode_rows` with dynamic shapes: under torchrun at TP=2 (1 layer, GQA
8:4, wq|wk|wv and w1|w3 fused as Llama.build loads) it gives the same greedy ids and log-probs as
eager decoding at TP=2 and at TP=1, and with --quantize int8 (fbgemm's kernel through its custom op,
the int8 head) the bundled model's ids equal eager's. On CUDA it compiles the static-shape
step (`llama.runner.decode_step`), which attends over the whole preallocated cache with a position
mask: eagerly it reproduces llama2.c's golden ids, and compiled (CUDA graphs) too. Inductor compiles
C++ kernels: 20-50 s a graph on 2 shared cores.
"""

import json
import os
import shutil

import pytest
import torch
from compile_worker import GEN_LEN, PROMPTS
from dist_utils import torchrun
from references import GOLDEN, REPO, STORIES, STORIES_TOKENIZER, load_stories, needs_cuda

from llama.config import LoadSpec
from llama.runner import decode_step
from llama.formats import layout, load, params
from llama.generation import Llama
from llama.kernels.schemes import parse_scheme
from llama.sampling import Sampling
from llama.tokenizer import load_tokenizer

TINY_PARAMS = {"dim": 64, "n_layers": 1, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512, "multiple_of": 32}
# Compiled kernels sum in another order than eager ones: float32 log-probs differ by ~1e-6.
LOGPROB_ATOL = 1e-4


def compile_unusable() -> str:
    """Why torch.compile (inductor on CPU) cannot run here, or '' if it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return "inductor needs a C++ compiler (g++ or clang++)"
    return ""


@pytest.mark.slow
def test_static_step_reproduces_golden_ids(world1):
    """Eager, with a position tensor: whole-cache attention + mask gives llama2.c's 200 greedy ids."""
    case = GOLDEN["greedy_bos_200"]
    model = load_stories(max_batch_size=1, max_seq_len=512)
    ids, pos = [], torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits = model(torch.tensor([case["prompt_ids"]]), 0)
        for step in range(case["n_generated"]):
            ids.append(logits[0, -1].argmax().item())
            pos.fill_(len(case["prompt_ids"]) + step)
            logits = decode_step(model, torch.tensor([[ids[-1]]]), pos).unsqueeze(1)
    assert ids == case["generated_ids"][: len(ids)]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    state = layout.random_state_dict(params.model_args(TINY_PARAMS), seed=0)
    (directory / "params.json").write_text(json.dumps(TINY_PARAMS))
    torch.save(state, directory / "consolidated.00.pth")
    return directory


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(bool(compile_unusable()), reason=compile_unusable() or "compile usable")
def test_compiled_tp2_equals_eager(world1, tiny_ckpt, tmp_path):
    """Inductor-compiled decoding at TP=2 (all-reduce and all-gather traced into the graph)."""
    out = tmp_path / "ids.pt"
    result = torchrun(2, REPO / "tests" / "compile_worker.py", "--ckpt", tiny_ckpt, "--tokenizer", STORIES_TOKENIZER, "--out", out, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    got = torch.load(out, weights_only=True)
    tokenizer = load_tokenizer(STORIES_TOKENIZER)
    model = load.load_model(LoadSpec(tiny_ckpt, max_seq_len=32, max_batch_size=len(PROMPTS), dtype=torch.float32),
                            vocab_size=tokenizer.n_words, device=world1.device, inference=True)
    done = Llama(model, tokenizer, world1).generate(PROMPTS, Sampling(max_tokens=GEN_LEN, top_logprobs=0))
    tp1_ids, tp1_lps = [c.ids for c in done], [[lp.logprob for lp in c.logprobs] for c in done]
    assert all(len(ids) == GEN_LEN for ids in tp1_ids), "EOS cut the comparison short"
    assert len(set(tp1_ids[0])) > 3, "degenerate greedy path"
    assert got["eager"] == tp1_ids, "TP=2 eager differs from TP=1"
    assert got["compiled"] == tp1_ids, "TP=2 compiled differs from eager"
    torch.testing.assert_close(torch.tensor(got["compiled_logprobs"]), torch.tensor(tp1_lps), rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.slow
@pytest.mark.skipif(bool(compile_unusable()), reason=compile_unusable() or "compile usable")
def test_compiled_quantized_cpu_decoding_equals_eager(world1):
    """--quantize int8 (fbgemm's kernel through its custom op where the probe passes, the int8 head; int4's
    kernel is an aten op inductor calls like any other): two prompts of different lengths (rows at their
    own positions: the tensor-position graph), then one alone (the int-position graph), compiled with
    dynamic shapes, give eager's ids; one graph per form, not one per position."""
    scheme = "int8"
    tokenizer = load_tokenizer(STORIES_TOKENIZER)
    spec = LoadSpec(STORIES, max_seq_len=64, max_batch_size=2, dtype=torch.float32, quantize=parse_scheme(scheme))
    model = load.load_model(spec, vocab_size=tokenizer.n_words, device=world1.device, inference=True)
    # the first block alone: dynamo unrolls the blocks, so compiling 5 takes ~2.3x as long as 1, and what is tested
    # here (the kernels' op in the graph, one graph per form) is in every block alike
    model.layers = model.layers[:1]
    sampling = Sampling(max_tokens=12)
    eager, compiled = Llama(model, tokenizer, world1), Llama(model, tokenizer, world1, compile=True)
    torch._dynamo.utils.counters.clear()
    for prompts in (PROMPTS, PROMPTS[:1]):
        assert [c.ids for c in compiled.generate(prompts, sampling)] == [c.ids for c in eager.generate(prompts, sampling)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@needs_cuda
def test_compiled_cuda_graphs_reproduce_golden_ids(world1):
    """mode="reduce-overhead": the step replays as a CUDA graph; float32 ids equal llama2.c's."""
    case = GOLDEN["greedy_bos_200"]
    tokenizer = load_tokenizer(STORIES_TOKENIZER)
    llm = Llama(load_stories("cuda", max_batch_size=1, max_seq_len=512), tokenizer, world1, compile=True)
    (done,) = llm.generate([case["prompt_ids"]], Sampling(max_tokens=case["n_generated"]))
    assert done.ids == case["generated_ids"]
