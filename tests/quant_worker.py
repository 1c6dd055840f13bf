"""torchrun worker for test_quantize.py: the bundled model quantized at TP=2, every scheme, one launch.

    torchrun --nproc_per_node 2 tests/quant_worker.py --out DIR --schemes int8,int4-g32,nf4

Each rank writes DIR/<scheme>.rank<R>.pt: the logits of fixed tokens, greedy ids of a prompt,
and for every quantized layer the float32 weight its kernel multiplies by (dequantized), the
kernel's error on random inputs against F.linear with the weight the pure scheme functions make of
this rank's slice, as a fraction of its derived bound (`kernel_error_bound`), plus, for nf4, the
codes and first-level absmax of its slice. test_quantize.py builds a TP=1 float model from the
gathered dequantized slices and compares.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, when not pip-installed
from llama import distributed  # noqa: E402
from llama.config import LoadSpec  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama import formats  # noqa: E402
from llama.kernels import schemes  # noqa: E402
from llama.kernels.linear import FbgemmInt8Linear, NF4Linear, QuantizedLinear  # noqa: E402
from llama.kernels.schemes import parse_scheme  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

STORIES = Path(__file__).resolve().parent.parent / "ckpts" / "stories260K"
LOGIT_TOKENS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
PROMPT, GEN_LEN = [1, 403, 407, 261, 378], 24
U32, U16 = 2**-24, 2**-8  # unit roundoff of float32 and of bfloat16 (8 significant bits)


def scheme_dequantized(weight: torch.Tensor, scheme: str, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The float32 weight the pure scheme functions make of `weight` (quantize with scales rounded to
    `scale_dtype`, then dequantize; no kernel, no packing)."""
    parsed = parse_scheme(scheme)
    if parsed.name == "int8":
        return schemes.dequantize_int8(*schemes.quantize_int8(weight, scale_dtype), weight.size(1))
    return schemes.dequantize_int4(*schemes.quantize_int4(weight, parsed.group_size, scale_dtype), *weight.shape)


def kernel_error_bound(kernel: QuantizedLinear, x: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A bound on |y - F.linear(x, W)| per output, from the arithmetic of the kernel that made y = kernel(x)
    (W: the float32 weight it multiplies by), with S = |x| @ |W|^T and K = in-features:

    - fbgemm (int8 activations): it multiplies x_hat = s_x (c - z) by W exactly in integers, where one
      scale covers the whole call, s_x = (max(x, 0) - min(x, 0)) / qmax (qmax 127 with reduce_range, else
      255), and each code is x / s_x rounded to the grid (the clamp moves an end value by less than half a
      step): |x_hat - x| <= s_x / 2, so each output is off by at most (s_x / 2) sum_k |W[n, k]|. Turning
      the int32 sum to float and multiplying by s_x and s_w adds at most 4 float32 roundings of
      |y_hat| <= S + |y| (the zero-point correction is integer arithmetic).
    - the bfloat16-activation kernels (_weight_int8pack_mm, _weight_int4pack_mm): x rounded to bfloat16
      (u16 S), the int4 kernel's (q - 8) s + z in bfloat16 (u16 S), the output rounded to bfloat16
      (u16 |y| <= u16 S), and float32 accumulation of K terms (gamma_K S, gamma_K = K u / (1 - K u)).
    """
    S = x.abs() @ W.abs().t()
    if isinstance(kernel, FbgemmInt8Linear):
        flat = x.reshape(-1, x.size(-1))
        s_x = (flat.max().clamp(min=0) - flat.min().clamp(max=0)) / (127 if kernel.reduce_range else 255)
        return s_x / 2 * W.abs().sum(dim=1) + 4 * U32 * (S + y.abs())
    K = x.size(-1)
    return (3 * U16 + K * U32 / (1 - K * U32)) * S


def activation_errors(model, tokens: torch.Tensor) -> list[float]:
    """||y - F.linear(x, W)|| / ||F.linear(x, W)|| of every call of an int8-activation (fbgemm) kernel in one
    forward of `tokens` (W: the weight it multiplies by): what quantizing the activations adds to each
    linear's output, the analogue for activations of a linear's relative weight error."""
    errors = []

    def record(kernel, args, y):
        exact = F.linear(args[0], kernel.dequantize())
        errors.append(((y - exact).norm() / exact.norm()).item())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, FbgemmInt8Linear)]
    try:
        with torch.inference_mode():
            model(tokens, 0)
    finally:
        for hook in hooks:
            hook.remove()
    return errors


def kernel_check(kernel: QuantizedLinear, W: torch.Tensor, x: torch.Tensor) -> float:
    """max |kernel(x) - F.linear(x, W)| / kernel_error_bound: at most 1 for a correct kernel."""
    y = kernel(x)
    return ((y - F.linear(x, W)).abs() / kernel_error_bound(kernel, x, W, y)).max().item()


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
    result["activation_errors"] = activation_errors(model, LOGIT_TOKENS)
    result["greedy"] = [c.ids for c in Llama(model, tokenizer, parallel).generate([PROMPT], Sampling(max_tokens=GEN_LEN))]
    layers = {name.removesuffix(".kernel") + ".weight": module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    result["dequantized"] = {key: kernel.dequantize() for key, kernel in layers.items()}
    ckpt, gen = formats.open_checkpoint(STORIES), torch.Generator().manual_seed(parallel.tp_rank)
    result["kernel_check"] = {}
    for key, kernel in layers.items():
        if scheme == "nf4":
            continue
        W = scheme_dequantized(ckpt.read(key, parallel.tp_rank, parallel.tp_size).float(), str(kernel.scheme), kernel.scale_dtype)
        x = torch.randn(3, 5, kernel.in_features, generator=gen)
        result["kernel_check"][key] = (type(kernel).__name__, kernel_check(kernel, W, x), torch.equal(kernel.dequantize(), W))
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
