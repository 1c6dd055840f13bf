"""stories260K against llama2.c's own C inference (tests/data/golden.json, see tests/data/SOURCE.md).

The greedy ids come from a loop over `Transformer.forward` only; test_generation.py checks the
same ids through `Llama.generate`. Every test runs on CPU float32 and, when CUDA exists, on
CUDA float32 and float16 with the tolerances stated in references.PRECISIONS.
"""

import pytest
import torch
from references import GOLDEN, GREEDY_CASES, LAST_LOGITS_CASES, PRECISIONS, STORIES_TOKENIZER, Precision, greedy_ids, load_stories

from llama.tokenizer import load_tokenizer


@pytest.mark.parametrize("inference,pack", [(False, "none"), (True, "none"), (True, "onednn"), (True, "mkl")],
                         ids=["separate", "fused", "fused-onednn", "fused-mkl"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_ids_match_llama2c(world1, precision: Precision, name: str, inference: bool, pack: str):
    """Also with wq|wk|wv and w1|w3 each one product, as Llama.build loads for inference, and with the dense
    linears packed for oneDNN or MKL (CPU float32 only: elsewhere --prepack changes nothing). Each packed GEMM
    is a float32 product in another summation order, as the fused one is: the same margin as fused covers it."""
    case = GOLDEN[name]
    model = load_stories(precision.device, precision.dtype, max_batch_size=1, inference=inference, pack=pack)
    n_new = min(case["n_generated"], precision.exact_ids)
    ids = greedy_ids(model, case["prompt_ids"], n_new)
    expected = case["generated_ids"][:n_new]
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), None)
    assert ids == expected, f"{name}: first differing generated id at index {first_diff}"


def test_greedy_text_matches_llama2c_test_suite(world1):
    """llama2.c's own test_all.py expects this text for `run -t 0.0 -n 200` (decoded by our tokenizer)."""
    expected = GOLDEN["public_expected_text"]["items"][0]["text"]
    ids = greedy_ids(load_stories(max_batch_size=1), [1], 200)
    assert load_tokenizer(STORIES_TOKENIZER).decode(ids) == expected


@pytest.mark.parametrize("precision", PRECISIONS)
def test_first_steps_top5_logits(world1, precision: Precision):
    """Positions 0..4 fed one token at a time through the cache, as run.c does."""
    model = load_stories(precision.device, precision.dtype, max_batch_size=1)
    first = GOLDEN["first_step_top5_after_bos"]
    steps = GOLDEN["greedy_bos_first5_steps_top5"]["steps"]
    assert steps[0]["top5_ids"] == first["top5_ids"] and steps[0]["top5_logits"] == first["top5_logits"]
    with torch.inference_mode():
        for step in steps:
            token = torch.tensor([[step["input_token"]]], device=precision.device)
            logits = model(token, step["position"])[0, -1].cpu()
            top = logits.topk(5)
            assert top.indices.tolist() == step["top5_ids"], f"position {step['position']}"
            torch.testing.assert_close(top.values, torch.tensor(step["top5_logits"]), rtol=0, atol=precision.logits_atol)
            if step["position"] == 0:
                stats = first["logits_stats"]
                assert abs(logits.max().item() - stats["max"]) <= precision.logits_atol
                assert abs(logits.min().item() - stats["min"]) <= precision.logits_atol
                assert abs(logits.mean().item() - stats["mean"]) <= precision.logits_atol


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", LAST_LOGITS_CASES)
def test_prompt_last_position_logits(world1, precision: Precision, name: str):
    """All 512 logits after a whole prompt in one forward vs run.c's token-by-token ones."""
    case = GOLDEN[name]
    model = load_stories(precision.device, precision.dtype, max_batch_size=1)
    with torch.inference_mode():
        logits = model(torch.tensor([case["prompt_ids"]], device=precision.device), 0)[0, -1].cpu()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.tensor(case["logits"]), rtol=0, atol=precision.logits_atol)
    assert logits.topk(5).indices.tolist() == case["top5_ids"]
    assert logits.argmax().item() == case["argmax"]
