"""torchrun worker for test_quantize.py: the bundled model quantized at TP=2, every scheme, one launch.

    torchrun --nproc_per_node 2 tests/quant_worker.py --out DIR --schemes int8,int4-g32,nf4

Each rank writes DIR/<scheme>.rank<R>.pt: the logits of fixed tokens, greedy ids of a prompt,
and for every quantized layer the float32 weight its kernel multiplies by (dequantized) plus,
for nf4, the codes and first-level absmax of its slice. test_quantize.py builds a TP=1 float
model from the gathered dequantized slices and compares.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.kernels.linear import NF4Linear, QuantizedLinear  # noqa: E402
from llama.kernels.schemes import parse_scheme  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

STORIES = Path(__file__).resolve().parent.parent / "ckpts" / "stories260K"
LOGIT_TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
PROMPT, GEN_LEN = [1, 403, 407, 261, 378], 24


def nf4_first_level(kernel: NF4Linear) -> dict:
    """The packed codes and the float32 absmax they were computed with (double quantization undone)."""
    import bitsandbytes.functional as bnb_f

    state = kernel.state
    absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return {"codes": kernel.packed.clone(), "absmax": absmax, "absmax_codes": state.absmax.clone()}


def outputs(scheme: str, parallel: distributed.Parallel) -> dict:
    tokenizer = load_tokenizer(STORIES / "tokenizer.model")
    spec = LoadSpec(STORIES, max_seq_len=64, max_batch_size=2, dtype=torch.float32, quantize=parse_scheme(scheme))
    model = load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    with torch.inference_mode():
        result = {"logits": model(LOGIT_TOKENS, 0)}
    result["greedy"] = [c.ids for c in Llama(model, tokenizer, parallel).generate([PROMPT], Sampling(max_tokens=GEN_LEN))]
    layers = {name.removesuffix(".kernel") + ".weight": module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    result["dequantized"] = {key: kernel.dequantize() for key, kernel in layers.items()}
    if scheme == "nf4":
        result["nf4"] = {key: nf4_first_level(kernel) for key, kernel in layers.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schemes", required=True)
    args = parser.parse_args()
    parallel = distributed.setup(2)
    for scheme in args.schemes.split(","):
        torch.save(outputs(scheme, parallel), args.out / f"{scheme}.rank{parallel.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()
