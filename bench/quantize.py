"""Weight-only quantization: per-rank memory after loading, CPU decode speed, QLoRA step cost.

  python bench/quantize.py [--layers 2] [--decode_steps 32] [--train_steps 4] [--workdir /tmp]

1. Memory: a random float32 checkpoint with Llama-2-7B shapes (dim 4096, hidden 11008, vocab
   32000, --layers blocks) is loaded as bfloat16 with --quantize none/int8/int4/nf4 on 1 and 2
   ranks (a fresh torchrun per case); rank 0 prints how much its RssAnon (heap and tensors, not
   the memory-mapped checkpoint) grew while loading. A float32 file makes every bfloat16 weight a
   copy, so `none` holds its bfloat16 weights in anonymous memory (a bfloat16 file would be
   mapped, not copied). The block linears' share is the growth minus the same run's unquantized
   rest (growth of `none` minus its bfloat16 linears), against their bfloat16 bytes.
2. Decode, batch 1, one thread: a random float32 110M-shaped model (dim 768, 12 layers, vocab
   32000), fp32 eager vs int8 and int4 kernels, in the same process (ratios are same-run).
3. QLoRA: a LoRA training step (the loss ft_main.py uses, AdamW) on the 7B-shaped model of 1.,
   unquantized float32 vs nf4 base, and transformers + PEFT + bitsandbytes QLoRA on the same shape
   and batch: tokens/s and the RSS high-water of the steps (after a warm-up step and malloc_trim),
   one fresh process each.
MB = 10^6 bytes.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PARAMS_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "norm_eps": 1e-05, "vocab_size": 32000}
PARAMS_110M = {"dim": 768, "multiple_of": 32, "n_heads": 12, "n_layers": 12, "norm_eps": 1e-05, "vocab_size": 32000}
SCHEMES = ["none", "int8", "int4", "nf4"]
TOKENIZER = REPO / "tests" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
MB = 10**6


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def write_checkpoint(directory: Path, params: dict, dtype: torch.dtype) -> Path:
    """A random 1-shard Meta checkpoint (+ the Llama 2 tokenizer)."""
    from llama.formats.layout import random_state_dict
    from llama.formats.params import model_args

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    state = {k: v.to(dtype) for k, v in random_state_dict(model_args(params), seed=0).items()}
    torch.save(state, directory / "consolidated.00.pth")
    (directory / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return directory


def load_worker(ckpt: str, scheme: str) -> None:
    """torchrun target: load this rank's slice and print RssAnon (rank 0)."""
    from llama import distributed
    from llama.config import LoadSpec
    from llama.formats.load import load_model
    from llama.kernels.linear import QuantizedLinear
    from llama.kernels.schemes import parse_scheme

    parallel = distributed.setup()
    before = rss_anon()
    spec = LoadSpec(Path(ckpt), max_seq_len=16, max_batch_size=0, dtype=torch.bfloat16, quantize=parse_scheme(scheme))
    model = load_model(spec, vocab_size=32000, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    linears = sum(k.nbytes() for k in model.modules() if isinstance(k, QuantizedLinear))
    grown = rss_anon() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: what remains is live
    if parallel.is_main:
        print(json.dumps({"rss_anon": grown, "rss_anon_trimmed": rss_anon() - before, "quantized_bytes": linears}), flush=True)
    distributed.teardown()


def memory(workdir: Path, layers: int) -> None:
    from llama.formats.params import model_args

    ckpt = write_checkpoint(workdir / "7b_shaped", {**PARAMS_7B, "n_layers": layers}, torch.float32)
    args = model_args({**PARAMS_7B, "n_layers": layers})
    print(f"## per-rank RssAnon growth while loading a {layers}-layer Llama-2-7B-shaped checkpoint as bfloat16")
    print("| ranks | quantize | RssAnon growth MB | after malloc_trim MB | quantized linears MB (derived, trimmed) | their bf16 MB | ratio | planner linears MB |")
    print("|---|---|---|---|---|---|---|---|")
    for ranks in (1, 2):
        base = None
        for scheme in SCHEMES:
            bf16_linears = linear_bytes(args, ranks, scheme, bf16=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(29700 + ranks),
                   __file__, "--load_worker", str(ckpt), "--quantize", scheme]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            record = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
            if scheme == "none":
                base = record["rss_anon_trimmed"]
                continue
            derived = record["rss_anon_trimmed"] - (base - bf16_linears)
            print(f"| {ranks} | {scheme} | {record['rss_anon'] / MB:.0f} | {record['rss_anon_trimmed'] / MB:.0f} | {derived / MB:.0f} | {bf16_linears / MB:.0f} | "
                  f"{derived / bf16_linears:.3f} | {linear_bytes(args, ranks, scheme) / MB:.0f} |", flush=True)


def linear_bytes(args, ranks: int, scheme: str, bf16: bool = False) -> int:
    """Bytes of the linears `scheme` quantizes (the block linears; under int8/int4 the head too) on one of
    `ranks` ranks: the planner's count, or (bf16) what they hold unquantized."""
    from llama.formats.layout import full_shapes, meta_model, split_dim
    from llama.formats.load import quantize_targets
    from llama.kernels.schemes import parse_scheme, weight_nbytes

    targets = quantize_targets(meta_model(args), parse_scheme(scheme))
    total = 0
    for key, (out_f, in_f) in ((k, s) for k, s in full_shapes(args).items() if k in targets):
        local = (out_f // ranks, in_f) if split_dim(key) == 0 else (out_f, in_f // ranks)
        total += weight_nbytes(None if bf16 else targets[key], *local, 2)
    return total


def decode(workdir: Path, steps: int) -> None:
    from llama import distributed
    from llama.config import LoadSpec
    from llama.runner import Runner
    from llama.formats.load import load_model
    from llama.kernels.schemes import parse_scheme

    torch.set_num_threads(1)
    ckpt = write_checkpoint(workdir / "110m", PARAMS_110M, torch.float32)
    distributed.setup(1)
    print(f"\n## CPU decode, batch 1, 1 thread, 110M shape (float32 model), {steps} steps after a 16-token prompt")
    print("| quantize | tokens/s | vs fp32 |")
    print("|---|---|---|")
    base = None
    for scheme in ["none", "int8", "int4", "int4-g32"]:
        spec = LoadSpec(ckpt, max_seq_len=64 + steps, max_batch_size=1, dtype=torch.float32, quantize=parse_scheme(scheme))
        model = load_model(spec, vocab_size=32000, device=torch.device("cpu"))
        runner = Runner(model, torch.device("cpu"))  # the engine's eager decode step
        tokens = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        best = float("inf")
        for _ in range(2):
            with torch.inference_mode():
                model(tokens, 0)
                nxt = int(tokens[0, -1])
                start = time.perf_counter()
                for pos in range(16, 16 + steps):
                    nxt = int(runner.decode([nxt], [pos]).argmax(-1))
                best = min(best, time.perf_counter() - start)
        rate = steps / best
        base = base or rate
        print(f"| {scheme} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
        del model
    distributed.teardown()


def train_worker(ckpt: str, scheme: str, steps: int) -> None:
    """One process: LoRA r=8 on the seven block linears over the base as --quantize says; AdamW steps on
    random tokens (batch 1 x 128). Prints tokens/s of the best step and the RSS high-water of the
    steps (VmHWM reset after a warm-up step; weights count whether mapped or anonymous)."""
    from llama import distributed, lora
    from llama.config import LoadSpec
    from llama.formats.load import load_model
    from llama.kernels.schemes import parse_scheme
    from llama.tuning import train

    torch.set_num_threads(1)
    distributed.setup()
    spec = LoadSpec(Path(ckpt), max_seq_len=128, max_batch_size=0, dtype=torch.float32, quantize=parse_scheme(scheme))
    model = load_model(spec, vocab_size=32000, device=torch.device("cpu")).train()
    lora.add_lora(model, list(lora.DEFAULT_TARGETS), r=8, alpha=16.0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # quantizing while loading leaves freed heap pages; count live memory only
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for step in range(steps + 1):
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM after the warm-up step
        start = time.perf_counter()
        loss = train.summed_loss(model, None, tokens[:, :-1], tokens[:, 1:], chunk_size=256) / tokens[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            best = min(best, time.perf_counter() - start)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"tokens_per_s": tokens[:, 1:].numel() / best, "peak_rss": peak}), flush=True)
    distributed.teardown()


def hf_train_worker(layers: int, steps: int) -> None:
    """transformers + PEFT + bitsandbytes QLoRA, as the QLoRA guides set it up: a LlamaForCausalLM of
    the same shape (its own random weights: speed and memory do not depend on their values) whose
    seven block linears are bitsandbytes Linear4bit (NF4, block 64, double quantization), LoRA r=8
    alpha 16 on them, its own loss, AdamW; measured like `train_worker`."""
    import bitsandbytes as bnb
    import peft
    import transformers

    torch.set_num_threads(1)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                             compress_statistics=True)._quantize("cpu")
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, layer)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    tokens = torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for step in range(steps + 1):
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            best = min(best, time.perf_counter() - start)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"tokens_per_s": 127 / best, "peak_rss": peak}), flush=True)


def qlora(workdir: Path, steps: int, layers: int) -> None:
    ckpt = workdir / "7b_shaped"
    if not ckpt.is_dir():
        write_checkpoint(ckpt, {**PARAMS_7B, "n_layers": layers}, torch.float32)
    print(f"\n## LoRA r=8 training step on the {layers}-layer 7B-shaped model (float32), batch 1 x 127 tokens, best of {steps} steps, 1 thread")
    print("| base | tokens/s | vs LoRA | peak RSS MB | vs LoRA |")
    print("|---|---|---|---|---|")
    base = None
    for scheme in ["none", "nf4", "hf-qlora"]:
        cmd = [sys.executable, __file__, "--train_worker", str(ckpt), "--quantize", scheme, "--train_steps", str(steps)]
        if scheme == "hf-qlora":  # transformers + PEFT + bitsandbytes on the same shape and batch
            cmd = [sys.executable, __file__, "--hf_train_worker", str(layers), "--train_steps", str(steps)]
        out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=REPO, check=True)
        record = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
        base = base or record
        print(f"| {scheme} | {record['tokens_per_s']:.0f} | {record['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{record['peak_rss'] / MB:.0f} | {record['peak_rss'] / base['peak_rss']:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--decode_steps", type=int, default=32)
    parser.add_argument("--train_steps", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--parts", default="memory,decode,qlora", help="which figures: memory, decode, qlora (comma-separated)")
    parser.add_argument("--load_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf_train_worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_worker:
        return load_worker(args.load_worker, args.quantize)
    if args.hf_train_worker:
        return hf_train_worker(args.hf_train_worker, args.train_steps)
    if args.train_worker:
        return train_worker(args.train_worker, args.quantize, args.train_steps)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if "memory" in args.parts:
            memory(Path(tmp), args.layers)
        if "decode" in args.parts:
            decode(Path(tmp), args.decode_steps)
        if "qlora" in args.parts:
            qlora(Path(tmp), args.train_steps, args.layers)


if __name__ == "__main__":
    main()
