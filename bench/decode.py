"""CPU decode tokens/s per scheme against the memory roofline and llama.cpp on the same weights, in one run.

    python bench/decode.py                                      # 110M and 7B (2 layers), batch 1 and 8, 1 and 2 threads
    python bench/decode.py --shapes 110M --batch 1 --threads 1 --repeats 5
    python bench/decode.py --levers                             # before/after per change (110M, batch 1, 1 thread)
    python bench/decode.py --keep /tmp/decode_bench             # keep (and reuse) the checkpoints and GGUF files

A random Llama-2-shaped Meta checkpoint per shape (110M: dim 768, 12 layers, vocab 32000; 7B: dim
4096, hidden 11008, 2 layers) is written once, float32. llama-mp loads it as `Llama.build` does
(wq|wk|wv and w1|w3 fused, --prepack auto) with --dtype float32 (fp32), --dtype bfloat16 (bf16), --quantize int8 and
int4 (float32 model; the head in int8), and decodes through the engine's runner (`Runner.decode`,
eager and with --compile), greedy: each row's 16-token prompt prefilled, then --steps steps, timed.
llama.cpp (through llama-cpp-python, a bench-only extra: `pip install -e ".[bench]"`; without it the
bench says so and skips it) reads the f32 GGUF that `split_model.py --out_format gguf` exports from
the same checkpoint, and the q8_0 / q4_0 files its own quantizer makes of it (its rules: under q4_0
the head becomes q6_K); it decodes at batch 1 only (its Python binding runs one sequence).

The machine is shared (2 cores; other jobs run test suites), so every figure is the best of
--repeats rounds in which all engines of a (shape, threads) group run once each, in an order rotated
from round to round, and the read bandwidth is measured in the same rounds. Ratios between engines of
one group are the figures to read.

Roofline: a step must read every weight byte once (each linear in its scheme's bytes: 4 / 2 / 1 / 0.5
per weight plus scales, the norms, one embedding row per row) and the KV cache so far (at the mean
position of the timed steps); roofline tokens/s = rows x read bandwidth / those bytes, and "of roof"
is the measured rate over it. llama.cpp's bytes are its GGUF tensors but the token embedding.

--levers times the changes of issue 24 one by one on top of each other (the "before" of each is the
engine of the row above): int8 with _weight_int8pack_mm, an fp32 head, separate projections, the
former RoPE/RMSNorm ops, eager -> + fbgemm -> + int8 head -> + fusion -> + fewer ops -> + --compile
(dynamic shapes); int4 and fp32 likewise with the levers that apply, plus fp32 with the former
--compile (the static whole-cache step), then fp32 + --prepack auto (oneDNN or MKL by thread count). The former code paths are switched back in for those
engines only (bench-only patches: `Levers.context`).
"""

import argparse
import contextlib
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import device_name, emit_json, format_table, read_bandwidth, rotated  # noqa: E402
from bench.quantize import PARAMS_7B, PARAMS_110M, write_checkpoint  # noqa: E402
from llama.kernels.packed import PACKINGS  # noqa: E402

PROMPT_LEN = 16
SHAPES = {"110M": PARAMS_110M, "7B": {**PARAMS_7B, "n_layers": 2}}
SCHEMES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8"), "int4": (torch.float32, "int4")}
LLAMACPP_BITS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
TABLE = [("shape", "shape", ""), ("threads", "threads", ""), ("batch", "batch", ""), ("engine", "engine", ""),
         ("tok_s", "tok/s", ".1f"), ("vs_llamacpp", "vs llama.cpp same bits", ".2f"), ("cpu_tok_s", "tok/s of CPU time", ".1f"),
         ("cpu_vs_llamacpp", "vs llama.cpp (CPU time)", ".2f"),
         ("mb_per_step", "MB read a step", ".0f"), ("roof_tok_s", "roofline tok/s", ".0f"), ("of_roof", "of roof", ".2f")]


# --- the levers, and the code they replaced (for --levers) ------------------------------------------------------

def former_precompute_rope(head_dim, end, *, theta, device=None, scaling=None):
    from llama.model import scale_rope_freqs

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = scale_rope_freqs(freqs, **scaling)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def former_apply_rope(x, rope):
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.view(-1, pairs.size(1), 1, pairs.size(3), 2)
    real = pairs[..., 0] * rope[..., 0] - pairs[..., 1] * rope[..., 1]
    imag = pairs[..., 1] * rope[..., 0] + pairs[..., 0] * rope[..., 1]
    return torch.stack([real, imag], dim=-1).flatten(3).type_as(x)


def former_rmsnorm_forward(self, x):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return normed.type_as(x) * self.weight


@dataclass(frozen=True)
class Levers:
    """Which of issue 24's changes an engine runs with (all: what `Llama.build` and --compile do now)."""

    fbgemm: bool = True  # int8 on CPU through fbgemm (else _weight_int8pack_mm)
    head: bool = True  # the output head quantized (int8) under int8 / int4
    fuse: bool = True  # wq|wk|wv and w1|w3 as one product each
    ops: bool = True  # RMSNorm as one op, RoPE as two products and a sum
    compile: Optional[str] = None  # None (eager), "dynamic" (--compile on CPU now), "static" (--compile before)
    prepack: str = "auto"  # --prepack: fp32 linears pre-packed for oneDNN / MKL by thread count ("none": F.linear)

    @contextlib.contextmanager
    def context(self):
        """The former code paths switched in where a lever is off (at load: kernel and head choice, RoPE table; at
        run time: RoPE and RMSNorm)."""
        from llama import model as model_module
        from llama.formats import load
        from llama.kernels import linear

        with contextlib.ExitStack() as stack:
            patch = lambda obj, name, value: stack.enter_context(_patched(obj, name, value))  # noqa: E731
            if not self.fbgemm:
                patch(linear, "fbgemm_reduce_range", lambda: None)
            if not self.head:
                targets = load.quantize_targets
                patch(load, "quantize_targets", lambda model, scheme: {k: v for k, v in targets(model, scheme).items() if k != "output.weight"})
            if not self.ops:
                patch(model_module, "precompute_rope", former_precompute_rope)
                patch(model_module, "apply_rope", former_apply_rope)
                patch(model_module.RMSNorm, "forward", former_rmsnorm_forward)
            yield


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


TODAY = Levers(fbgemm=False, head=False, fuse=False, ops=False, prepack="none")
UNPACKED = replace(Levers(), prepack="none")
LEVER_STEPS = {  # scheme -> [(name, levers)], each adding one change to the one before
    "int8": [("int8 before", TODAY), ("+ fbgemm int8", replace(TODAY, fbgemm=True)), ("+ int8 head", replace(TODAY, fbgemm=True, head=True)),
             ("+ fusion", replace(TODAY, fbgemm=True, head=True, fuse=True)), ("+ fewer ops", Levers()), ("+ compile dynamic", Levers(compile="dynamic"))],
    "int4": [("int4 before", TODAY), ("+ int8 head (fbgemm)", replace(TODAY, fbgemm=True, head=True)),
             ("+ fusion", replace(TODAY, fbgemm=True, head=True, fuse=True)),
             ("+ fewer ops", Levers()), ("+ compile dynamic", Levers(compile="dynamic"))],
    "fp32": [("fp32 before", TODAY), ("+ fusion", replace(TODAY, fuse=True)), ("+ fewer ops", UNPACKED),
             ("+ compile static (former --compile)", replace(UNPACKED, compile="static")),
             ("+ compile dynamic", replace(UNPACKED, compile="dynamic")), ("+ --prepack auto", Levers(compile="dynamic"))],
}


# --- engines ---------------------------------------------------------------------------------------------------

def load(ckpt: Path, scheme: str, levers: Levers, rows: int, max_seq_len: int):
    """The checkpoint as `scheme` with `levers` (those that act at load), with a KV cache of `rows` rows."""
    from llama.config import LoadSpec
    from llama.formats.load import load_model
    from llama.kernels.schemes import parse_scheme

    dtype, quantize = SCHEMES[scheme]
    spec = LoadSpec(ckpt, max_seq_len=max_seq_len, max_batch_size=rows, dtype=dtype, quantize=parse_scheme(quantize), prepack=levers.prepack)
    with levers.context():
        return load_model(spec, vocab_size=SHAPES_VOCAB, device=torch.device("cpu"), inference=levers.fuse)


class Ours:
    """A loaded model (`load`) decoding `batch` rows through the engine's runner, with `levers`."""

    def __init__(self, model, scheme: str, levers: Levers, batch: int, steps: int):
        from llama.runner import Runner, decode_step

        self.model, self.levers, self.batch, self.scheme = model, levers, batch, scheme
        self.runner = Runner(self.model, torch.device("cpu"), compile=levers.compile == "dynamic")
        if levers.compile == "static":  # the former --compile on CPU: the whole-cache step, one static shape
            self.runner.compiled, self.runner.static = torch.compile(decode_step, fullgraph=True, dynamic=False), True
        gen = torch.Generator().manual_seed(0)
        self.prompts = torch.randint(3, SHAPES_VOCAB, (batch, PROMPT_LEN), generator=gen).tolist()
        self.steps = steps

    @torch.inference_mode()
    def decode(self, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds of `steps` decode steps after each row's prompt."""
        from llama.runner import Prefill

        with self.levers.context():
            tokens = [int(self.runner.prefill(Prefill(row, prompt)).argmax()) for row, prompt in enumerate(self.prompts)]
            begin, cpu = time.perf_counter(), time.process_time()
            for step in range(steps):
                logits = self.runner.decode(tokens, [PROMPT_LEN + step] * self.batch)
                tokens = logits.argmax(-1).tolist()
            return time.perf_counter() - begin, time.process_time() - cpu

    def bytes_per_step(self, steps: int) -> int:
        """Weight bytes a step reads (each linear in its scheme's bytes) + the KV cache at the mean position."""
        from llama.formats.layout import full_shapes
        from llama.formats.load import quantize_targets
        from llama.kernels.schemes import parse_scheme, weight_nbytes

        args, (dtype, quantize) = self.model.args, SCHEMES[self.scheme]
        with self.levers.context():
            targets = quantize_targets(self.model, parse_scheme(quantize))
        size = torch.tensor([], dtype=dtype).element_size()
        total = 0
        for key, shape in full_shapes(args).items():
            if key == "tok_embeddings.weight":
                total += self.batch * args.dim * size  # one row per sequence
            elif key in targets:
                total += weight_nbytes(targets[key], *shape, size)
            else:
                total += math.prod(shape) * size
        mean_position = PROMPT_LEN + steps / 2
        kv = 2 * args.n_layers * args.kv_heads * args.head_dim * mean_position * size
        return int(total + self.batch * kv)


class LlamaCpp:
    """A GGUF loaded by llama.cpp, decoding greedily at batch 1."""

    def __init__(self, path: Path, threads: int, max_seq_len: int):
        import llama_cpp

        with quiet_stderr():
            self.llm = llama_cpp.Llama(str(path), n_ctx=max_seq_len, n_batch=PROMPT_LEN, n_threads=threads, n_threads_batch=threads,
                                       verbose=False, logits_all=False)
        self.prompt = torch.randint(3, SHAPES_VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
        self.path, self.batch = path, 1

    def decode(self, steps: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        llm.eval(self.prompt)
        token = self.argmax()
        begin, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            llm.eval([token])
            token = self.argmax()
        return time.perf_counter() - begin, time.process_time() - cpu

    def argmax(self) -> int:
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def bytes_per_step(self, steps: int) -> int:
        """Its tensors but the token embedding (one row is read), + its f16 KV cache at the mean position."""
        from gguf import GGUFReader

        reader = GGUFReader(self.path)
        weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
        layers = sum(1 for t in reader.tensors if t.name.endswith("attn_k.weight"))
        kv_dim = next(int(t.shape[1]) for t in reader.tensors if t.name.endswith("attn_k.weight"))
        return int(weights + 2 * layers * kv_dim * (PROMPT_LEN + steps / 2) * 2)


SHAPES_VOCAB = 32000


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to the C stderr; silence fd 2 while it loads or quantizes (its errors still raise)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def make_files(workdir: Path, shape: str, llamacpp: bool) -> dict[str, Path]:
    """The random checkpoint of `shape` and, with llama.cpp, its f32 GGUF and llama.cpp's q8_0 / q4_0; reused if present."""
    ckpt = workdir / shape
    if not (ckpt / "consolidated.00.pth").exists():
        write_checkpoint(ckpt, SHAPES[shape], torch.float32)
    files = {"ckpt": ckpt}
    if not llamacpp:
        return files
    import llama_cpp

    gguf_dir = workdir / f"{shape}_gguf"
    files["f32"] = gguf_dir / "model.gguf"
    if not files["f32"].exists():
        subprocess.run([sys.executable, str(REPO / "split_model.py"), "--ckpt_dir", str(ckpt), "--out_format", "gguf", "--out_dir", str(gguf_dir),
                        "--force"], check=True, stdout=subprocess.DEVNULL)
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        files[name] = gguf_dir / f"model-{name}.gguf"
        if not files[name].exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, 2
            with quiet_stderr():
                status = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(files[name]).encode(), params)
            if status != 0:
                raise RuntimeError(f"llama_model_quantize to {name} returned {status}")
    return files


def run_group(engines: dict[str, object], *, steps: int, repeats: int, bandwidth_buffer: torch.Tensor) -> tuple[dict, dict, float]:
    """Best wall and CPU seconds per engine over `repeats` rotated rounds, and the best read bandwidth of those rounds."""
    for engine in engines.values():
        engine.decode(4)  # warm-up, and compilation (dynamic shapes: the graph then serves every position)
    best, best_cpu, bandwidth = dict.fromkeys(engines, math.inf), dict.fromkeys(engines, math.inf), 0.0
    items = [("bandwidth", None), *engines.items()]
    for round_index in range(repeats):
        for name, engine in rotated(items, round_index):
            if engine is None:
                bandwidth = max(bandwidth, read_bandwidth(bandwidth_buffer))
                continue
            seconds, cpu_seconds = engine.decode(steps)
            best[name], best_cpu[name] = min(best[name], seconds), min(best_cpu[name], cpu_seconds)
    return best, best_cpu, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"], help="llama-mp without and with --compile")
    parser.add_argument("--prepack", default="auto", choices=PACKINGS, help="llama-mp's --prepack for the fp32 linears (README 'Threads')")
    parser.add_argument("--levers", action="store_true", help="before/after per change instead (first shape, batch and thread count given)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each engine's best is kept")
    parser.add_argument("--max_seq_len", type=int, default=512, help="KV-cache positions (example.py's default)")
    parser.add_argument("--no_llamacpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep (reused when the files exist)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    use_llamacpp = llama_cpp is not None and not args.no_llamacpp
    from llama import distributed
    from llama.kernels.linear import fbgemm_reduce_range

    info = f"llama-cpp-python {llama_cpp.__version__}" if llama_cpp else "llama-cpp-python not installed (pip install -e \".[bench]\"): llama.cpp skipped"
    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), fbgemm int8 "
          f"reduce_range={fbgemm_reduce_range()}, {info}, load {os.getloadavg()[0]:.1f}, {datetime.date.today().isoformat()}", flush=True)
    # every compiled engine is a model of its own, so a graph of its own for the same function: allow them all, and
    # fail rather than fall back to eager silently past the limit
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    buffer = torch.ones(512 << 20 >> 2)
    records = []
    distributed.setup(1)
    shapes, batches, threads_list = (args.shapes[:1], args.batch[:1], args.threads[:1]) if args.levers else (args.shapes, args.batch, args.threads)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()) as workdir:
        for shape in shapes:
            files = make_files(Path(workdir), shape, use_llamacpp)
            max_seq_len = max(args.max_seq_len, PROMPT_LEN + args.steps + 8)
            for threads in threads_list:
                torch.set_num_threads(threads)
                engines, models = {}, {}

                def ours(scheme: str, levers: Levers, batch: int) -> Ours:  # engines differing in batch or compile share a model
                    key = (scheme, replace(levers, compile=None))
                    if key not in models:
                        models[key] = load(files["ckpt"], scheme, levers, max(batches), max_seq_len)
                    return Ours(models[key], scheme, levers, batch, args.steps)

                if use_llamacpp:
                    engines.update({f"llama.cpp {bits}": LlamaCpp(files[bits], threads, max_seq_len) for bits in LLAMACPP_BITS.values()})
                for batch in batches:
                    for scheme in args.schemes:
                        if args.levers:
                            for name, levers in LEVER_STEPS.get(scheme, []):
                                engines[name if "before" in name else f"{scheme} {name}"] = ours(scheme, levers, batch)
                            continue
                        for mode in args.modes:
                            engines[f"{scheme} {mode} b{batch}"] = ours(scheme, Levers(compile="dynamic" if mode == "compile" else None, prepack=args.prepack), batch)
                print(f"# {shape}, {threads} thread(s): {len(engines)} engines, {args.repeats} rounds", flush=True)
                best, best_cpu, bandwidth = run_group(engines, steps=args.steps, repeats=args.repeats, bandwidth_buffer=buffer)
                for name, engine in engines.items():
                    rate = engine.batch * args.steps / best[name]
                    scheme = getattr(engine, "scheme", None)
                    theirs = f"llama.cpp {LLAMACPP_BITS[scheme]}" if scheme in LLAMACPP_BITS and engine.batch == 1 else None
                    step_bytes = engine.bytes_per_step(args.steps)
                    roof = engine.batch * bandwidth / step_bytes
                    records.append(dict(
                        bench="decode", shape=shape, threads=threads, batch=engine.batch, engine=name, tok_s=rate,
                        cpu_tok_s=engine.batch * args.steps / best_cpu[name] if threads == 1 else None,
                        vs_llamacpp=rate / (args.steps / best[theirs]) if theirs in best else None,
                        cpu_vs_llamacpp=best_cpu[theirs] / best_cpu[name] * engine.batch if theirs in best and threads == 1 else None,
                        mb_per_step=step_bytes / 1e6, bandwidth_gb_s=bandwidth / 1e9, roof_tok_s=roof, of_roof=rate / roof))
                    emit_json(records[-1], args.out)
                del engines, models
    distributed.teardown()
    print("\n" + format_table(records, TABLE), flush=True)


if __name__ == "__main__":
    main()
