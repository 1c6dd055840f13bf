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
from llama import distributed, quantize  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

STORIES = Path(__file__).resolve().parent.parent / "ckpts" / "stories260K"
LOGIT_TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
PROMPT, GEN_LEN = [1, 403, 407, 261, 378], 24


def nf4_first_level(kernel: quantize.NF4Weight) -> dict:
    """The packed codes and the float32 absmax they were computed with (double quantization undone)."""
    import bitsandbytes.functional as bnb_f

    state = kernel.state
    absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return {"codes": kernel.packed.clone(), "absmax": absmax, "absmax_codes": state.absmax.clone()}


def outputs(scheme: str, parallel: distributed.Parallel) -> dict:
    tokenizer = load_tokenizer(STORIES / "tokenizer.model")
    model = load_model(STORIES, tokenizer.n_words, 64, 2, torch.float32, parallel.device, parallel.tp_rank, parallel.tp_size,
                                  quantize=scheme)
    with torch.inference_mode():
        result = {"logits": model(LOGIT_TOKENS, 0)}
    result["greedy"], _ = Llama(model, tokenizer, parallel).generate([PROMPT], Sampling(max_new=GEN_LEN))
    layers = quantize.quantized_layers(model)
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
