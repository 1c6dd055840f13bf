"""Generation speed against the memory roofline: prefill and decode tokens/s, time to first token, peak memory.

Decoding one token reads every weight of this rank (and the KV cache so far) once, so its speed
limit is memory bandwidth / bytes read per step. The same run measures this machine's copy
bandwidth (bytes read + written) and prints decode speed as a fraction of that roofline.

    python bench/generate.py                                    # CPU: stories260K, 110M, 7B (2 layers); batch 1 and 8
    python bench/generate.py --shapes 110M --batch 1 --repeats 10
    torchrun --nproc_per_node 2 bench/generate.py --shapes 110M # tensor parallel; rank 0 prints
    python bench/generate.py --device cuda --shapes 7B --batch 1 --dtype float16 --compile --out results.jsonl

Shapes other than stories260K (the bundled real model) get random weights generated on the
device: nothing is downloaded and no checkpoint is written. Prints one JSON line per
configuration, then a Markdown table.
"""

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import (  # noqa: E402
    copy_bandwidth,
    device_name,
    emit_json,
    format_table,
    peak_memory,
    reset_peak_memory,
    start,
    synchronize,
)
from llama import distributed  # noqa: E402
from llama.config import LoadSpec, parse_dtype  # noqa: E402
from llama.engine import Request  # noqa: E402
from llama.errors import UserError, run_cli  # noqa: E402
from llama.formats import layout  # noqa: E402
from llama.formats.load import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import CacheSpan, ModelArgs, Transformer  # noqa: E402
from llama.sampling import Sampling  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

STORIES = REPO / "ckpts" / "stories260K"
LLAMA2_TOKENIZER = REPO / "tests" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
# Random-weight shapes (Llama 2 vocabulary); stories260K is the bundled checkpoint instead.
SHAPES: dict[str, Optional[dict]] = {
    "stories260K": None,
    "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
}
CPU_7B_LAYERS = 2  # a whole 7B model decodes at well under 1 token/s on a few CPU cores

TABLE = [
    ("shape", "shape", ""), ("layers", "layers", ""), ("dtype", "dtype", ""), ("tp", "TP", ""), ("compile", "compile", ""),
    ("batch", "batch", ""), ("prefill_tok_s", "prefill tok/s", ".0f"), ("ttft_ms", "TTFT ms", ".1f"),
    ("decode_tok_s", "decode tok/s", ".1f"), ("roofline_tok_s", "roofline tok/s", ".1f"),
    ("roofline_fraction", "of roofline", ".0%"), ("bandwidth_gb_s", "copy GB/s", ".1f"), ("peak_mem_gib", "peak GiB", ".2f"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="model shapes to run")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (rows decoded together)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if visible, else cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--layers", type=int, default=None, help=f"layers of the random shapes (default: all; 7B on CPU: {CPU_7B_LAYERS})")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--gen_len", type=int, default=None, help="tokens generated per row (default: 32 on CPU, 256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per configuration; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's operator table of one generation (stderr)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda but no CUDA device is visible: run on a GPU machine or pass --device cpu")
    if args.device == "cpu" and cuda:
        raise UserError("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= to bench the CPU")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    args.gen_len = args.gen_len or (256 if args.device == "cuda" else 32)
    if args.prompt_len < 1 or args.gen_len < 2 or args.repeats < 1 or min(args.batch) < 1:
        raise UserError("--prompt_len, --repeats and --batch must be >= 1 and --gen_len >= 2")
    return args


def shape_args(shape: str, layers: Optional[int], device: str) -> ModelArgs:
    """ModelArgs of a random-weight shape, with fewer layers if asked (7B on CPU by default)."""
    args = ModelArgs(**SHAPES[shape])
    if layers is not None:
        args.n_layers = layers
    elif shape == "7B" and device == "cpu":
        args.n_layers = CPU_7B_LAYERS
    return args


def random_model(args: ModelArgs, dtype: torch.dtype, parallel: distributed.Parallel, max_batch: int, max_seq_len: int) -> Transformer:
    """This rank's slice of a model with random weights, drawn directly on the device.

    Drawing on the device in the target dtype avoids materialising a float32 7B model on the
    host first; the values are irrelevant to speed (scaled 1/sqrt(fan_in) to stay finite).
    """
    layout.check_shardable(args, parallel.tp_size)
    device = parallel.device
    gen = torch.Generator(device).manual_seed(parallel.tp_rank)
    state = {}
    for key, shape in layout.full_shapes(args).items():
        local = list(shape)
        split = layout.split_dim(key)
        if split is not None:
            local[split] //= parallel.tp_size
        if key.endswith("norm.weight"):
            state[key] = torch.ones(local, dtype=dtype, device=device)
        else:
            state[key] = torch.randn(local, generator=gen, dtype=dtype, device=device).mul_(shape[-1] ** -0.5)
    with torch.device("meta"):
        model = Transformer(args, parallel.tp_size)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.setup_caches(max_batch, max_seq_len)
    return model.eval()


def build(shape: str, cli: argparse.Namespace, parallel: distributed.Parallel) -> tuple[Llama, str]:
    """The Llama for a shape on this rank, and a label of its layer count."""
    dtype, max_seq_len = parse_dtype(cli.dtype), cli.prompt_len + cli.gen_len
    if SHAPES[shape] is None:
        tokenizer = load_tokenizer(STORIES / "tokenizer.model")
        spec = LoadSpec(STORIES, max_seq_len=max_seq_len, max_batch_size=max(cli.batch), dtype=dtype)
        model = load_model(spec, vocab_size=tokenizer.n_words, device=parallel.device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    else:
        tokenizer = load_tokenizer(LLAMA2_TOKENIZER)
        model = random_model(shape_args(shape, cli.layers, cli.device), dtype, parallel, max(cli.batch), max_seq_len)
    return Llama(model, tokenizer, parallel, compile=cli.compile), str(model.args.n_layers)


def bytes_per_step(model: Transformer, batch: int, mean_keys: float) -> tuple[int, float]:
    """Bytes one decoding step reads on this rank: (weights, KV cache at `mean_keys` positions).

    Every weight is read once per step except the embedding table, of which only `batch` rows
    are (negligible, left out). The KV cache is counted up to the current position in every
    row, what a step needs; the compiled static-shape step reads the whole cache, and is
    charged for only this.
    """
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    cache = model.layers[0].attention.cache
    per_position = 2 * len(model.layers) * cache.k.size(1) * cache.k.size(3) * cache.k.element_size()
    return weights, batch * mean_keys * per_position


@torch.inference_mode()
def time_prefill(llm: Llama, prompts: torch.Tensor, repeats: int) -> float:
    """Best seconds for the prompt's forward pass (logits of the last position, as generation runs it)."""
    device, best = llm.parallel.device, float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        llm.model.output(llm.model.hidden_states(prompts, CacheSpan(slice(0, prompts.size(0)), 0))[:, -1])
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def time_generation(llm: Llama, prompts: list[list[int]], gen_len: int) -> tuple[float, float, int]:
    """(time to first token, decode seconds, decode steps) of one greedy generation.

    The first token needs the prompt's forward pass; every later one a decoding step. Rows
    that hit EOS early (random weights rarely do) only shorten the run, which is counted.
    """
    device, engine = llm.parallel.device, llm.engine
    requests = [Request(p, Sampling(max_tokens=gen_len)) for p in prompts]
    engine.add(requests)
    synchronize(device)
    start = time.perf_counter()
    engine.step()  # the prefills (every row is admitted at once: batch <= cache rows)
    synchronize(device)
    first, steps = time.perf_counter(), 0
    while any(r.finish_reason is None for r in requests):
        engine.step()
        steps += 1
    synchronize(device)
    return first - start, time.perf_counter() - first, steps


def run_config(llm: Llama, shape: str, layers: str, batch: int, cli: argparse.Namespace) -> dict:
    """Measure one (shape, batch) configuration; every rank runs it, rank 0's figures are reported.

    The copy bandwidth is measured before each timed generation and the best of each is kept,
    so that on a machine shared with other jobs the roofline and the decode speed are both
    taken under the most favourable conditions seen, side by side.
    """
    device, vocab = llm.parallel.device, llm.model.args.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, cli.prompt_len), generator=gen)  # no BOS/EOS/pad ids
    prompt_lists = prompts.tolist()
    time_generation(llm, prompt_lists, min(cli.gen_len, 8))  # warm-up (and compilation for this batch size)
    prefill_s = time_prefill(llm, prompts.to(device), cli.repeats)
    bandwidths, runs, peaks = [], [], []
    for _ in range(cli.repeats):
        bandwidths.append(measure_bandwidth(device))
        reset_peak_memory(device)  # after the copy buffers are freed
        runs.append(time_generation(llm, prompt_lists, cli.gen_len))
        peaks.append(peak_memory(device))
    peak, bandwidth = max(peaks), max(bandwidths)
    if cli.profile:
        print_profile(llm, prompt_lists, cli.gen_len)
    step_rates = [steps / seconds for _, seconds, steps in runs if steps > 0]
    steps = max(s for _, _, s in runs)
    weights, kv = bytes_per_step(llm.model, batch, cli.prompt_len + (steps + 1) / 2)
    roofline_steps = bandwidth / (weights + kv)
    return {
        "bench": "generate", "date": datetime.date.today().isoformat(), "device": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "shape": shape, "layers": layers, "dtype": cli.dtype, "tp": llm.parallel.tp_size, "compile": cli.compile,
        "batch": batch, "prompt_len": cli.prompt_len, "decode_steps": steps,
        "prefill_tok_s": batch * cli.prompt_len / prefill_s,
        "ttft_ms": 1000 * min(first for first, _, _ in runs),
        "decode_tok_s": batch * max(step_rates),
        "decode_tok_s_runs": [round(batch * rate, 2) for rate in step_rates],
        "peak_mem_gib": peak / 2**30,
        "weights_gb": weights / 1e9, "kv_gb": kv / 1e9, "bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_gb_s_runs": [round(b / 1e9, 2) for b in bandwidths],
        "roofline_tok_s": batch * roofline_steps,
        "roofline_fraction": max(step_rates) / roofline_steps,
    }


def print_profile(llm: Llama, prompts: list[list[int]], gen_len: int) -> None:
    """torch.profiler's table of one generation, most self time first: where a decoding step goes."""
    cuda = llm.parallel.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_generation(llm, prompts, gen_len)
    if llm.parallel.is_main:
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)
        print(table, file=sys.stderr, flush=True)


def measure_bandwidth(device: torch.device) -> float:
    """Copy bandwidth of this rank's device, all ranks copying at once (as they decode at once)."""
    dist.barrier()
    return copy_bandwidth(device)


def main() -> None:
    cli = parse_args()
    parallel = start(cli.threads, cli.dtype, device_name)
    try:
        records = []
        configs = [(shape, batch) for shape in cli.shapes for batch in cli.batch]
        progress = tqdm(total=len(configs), desc="configurations", disable=not parallel.is_main, file=sys.stderr)
        for shape in cli.shapes:
            llm, layers = build(shape, cli, parallel)
            for batch in cli.batch:
                record = run_config(llm, shape, layers, batch, cli)
                records.append(record)
                if parallel.is_main:
                    emit_json(record, cli.out)
                progress.update()
            del llm
        progress.close()
        if parallel.is_main:
            print(format_table(records, TABLE), flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
