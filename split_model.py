"""Every checkpoint transform: reshard, convert Meta <-> Hugging Face, export GGUF, plan memory.

  python split_model.py --ckpt_dir DIR --num_shards N [--out_dir OUT] [--dtype keep] [--force] [--verify]
  python split_model.py --ckpt_dir DIR --adapter ADAPTER --num_shards N   (merge a LoRA adapter: W + alpha/r * B A)
  python split_model.py --ckpt_dir DIR --out_format hf [--dtype bfloat16] [--verify]
  python split_model.py --ckpt_dir DIR --out_format gguf [--dtype float32|float16|q8_0]
  python split_model.py --plan --model llama-3-70b (or --ckpt_dir DIR, --params params.json) --gpu_mem 24GiB --batch_size 8 --seq_len 512
                        [--mode infer|prompt-tune|lora|full] [--lora_rank 8] [--data_parallel D] [--checkpoint_activations]

DIR is a Meta directory (params.json, consolidated.NN.pth) or a Hugging Face folder (config.json,
*.safetensors). The Meta output (default <DIR>_mp<N>) is what a Meta N-way checkpoint would be, plus
manifest.json; `torchrun --nproc_per_node N example.py --ckpt_dir OUT` runs it. M -> N works both
ways (split, merge, re-split) in memory near one output shard. --out_format hf writes a folder
`transformers` loads (default <DIR>_hf); gguf writes model.gguf for llama.cpp (default <DIR>_gguf,
needs the optional `gguf` package: pip install -e .[gguf]).
"""

import argparse
import signal
from pathlib import Path

from llama import cli
from llama.config import DTYPES, parse_dtype
from llama.errors import UserError, run_cli
from llama.files import GiB, parse_size
from llama.formats import OUT_FORMATS, open_checkpoint, plan
from llama.formats.convert import convert
from llama.formats.params import model_args, read_params
from llama.formats.presets import PRESETS, preset
from llama.kernels.schemes import head_scheme, parse_scheme
from llama.tuning.methods import check_training


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--ckpt_dir", type=Path, help=cli.MODEL_DIR_HELP)
    parser.add_argument("--num_shards", type=int, help="N, the number of output shards (tensor-parallel ranks) of a Meta output")
    parser.add_argument("--out_format", choices=OUT_FORMATS, default="meta", help="meta (Meta N shards), hf (Hugging Face folder) or gguf (llama.cpp)")
    parser.add_argument("--out_dir", type=Path, help="output directory; default <ckpt_dir>_mp<N>, <ckpt_dir>_hf or <ckpt_dir>_gguf (<ckpt_dir>_merged_... with --adapter)")
    parser.add_argument("--dtype", default=None,
                        help=f"meta/hf: output dtype, keep (default) or one of {', '.join(DTYPES)}; gguf: float32 (default), float16 or q8_0; "
                             "--plan: runtime dtype (default float16)")
    parser.add_argument("--max_shard_size", default="5GB", help="hf: largest safetensors file before splitting")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter (ft_main.py's adapter.pt or a PEFT LoRA directory) merged into the output")
    parser.add_argument("--force", action="store_true", help="replace the shards in an existing non-empty --out_dir")
    parser.add_argument("--verify", action="store_true", help="re-read the output and check it bit for bit against the input")
    planning = parser.add_argument_group("memory planner (--plan)")
    planning.add_argument("--plan", action="store_true", help="print per-card memory for N = 1, 2, 4, 8 instead of resharding")
    planning.add_argument("--model", help=f"a released model to plan for, before any download: {', '.join(PRESETS)}")
    planning.add_argument("--params", type=Path, help="params.json to plan for (instead of --ckpt_dir)")
    planning.add_argument("--vocab_size", type=int, help="vocabulary size when params.json says -1 and there are no shards")
    planning.add_argument("--gpu_mem", default="12GiB", help="memory of one card, e.g. 12GiB, 24GB")
    planning.add_argument("--batch_size", type=int, default=8, help="sequences per batch")
    planning.add_argument("--seq_len", type=int, default=512, help="tokens per sequence, soft prompt included")
    planning.add_argument("--mode", choices=plan.MODES, default="infer", help="what the cards will run (lora/full: ft_main.py --method)")
    planning.add_argument("--lora_rank", type=int, default=8, help="lora: adapter rank (all seven block linears)")
    planning.add_argument("--data_parallel", type=int, default=1, help="full: data-parallel ranks sharing the AdamW states (ZeRO)")
    planning.add_argument("--checkpoint_activations", action="store_true", help="lora, full: keep only each block's input")
    planning.add_argument("--overhead", default="1GiB", help="CUDA context and allocator slack per card")
    planning.add_argument("--quantize", default="none", help="infer: none, int8, int4[-g32|-g64|-g128] or nf4; lora: nf4 (QLoRA)")
    planning.add_argument("--objective", default="sft", choices=("sft", "dpo"), help="training: sft, or dpo (--batch_size counts pairs: "
                          "twice the sequences)")
    args = parser.parse_args(argv)
    for name in ("num_shards", "batch_size", "seq_len", "lora_rank", "data_parallel"):
        cli.positive(name, getattr(args, name))
    return args


def plan_model(args: argparse.Namespace) -> str:
    """The planner's table for --params or --ckpt_dir (vocab -1 is read from the shards' shapes)."""
    if sum(x is not None for x in (args.model, args.params, args.ckpt_dir)) != 1:
        raise UserError(f"--plan needs one of --model NAME (a released model: {', '.join(PRESETS)}), --ckpt_dir DIR or --params params.json")
    if args.model is not None:
        model = preset(args.model)
    elif args.params is not None:
        params = read_params(args.params)
        if params.get("vocab_size", -1) == -1 and args.vocab_size is None:
            raise UserError("params.json says vocab_size -1: pass --vocab_size (32000 for Llama 1/2) or --ckpt_dir")
        model = model_args(params, args.vocab_size)
    else:
        model = open_checkpoint(args.ckpt_dir, args.vocab_size).args
    dtype = parse_dtype("float16" if args.dtype in (None, "keep") else args.dtype)
    gpu_mem, overhead = parse_size(args.gpu_mem), parse_size(args.overhead)
    scheme = parse_scheme(args.quantize)
    if args.mode != "infer":
        check_training(args.mode, scheme)
    if args.objective == "dpo" and args.mode == "infer":
        raise UserError("--objective dpo plans a tuning run: add --mode prompt-tune, lora or full")
    work = plan.Workload(args.mode, args.batch_size, args.seq_len, dtype.itemsize, data_parallel=args.data_parallel, lora_rank=args.lora_rank,
                         checkpoint_activations=args.checkpoint_activations, quantize=scheme, objective=args.objective)
    rows = [plan.estimate(model, n, work, overhead=overhead) for n in plan.CARD_COUNTS]
    batch = f"{args.batch_size} pairs (x2 sequences, DPO)" if args.objective == "dpo" else args.batch_size
    header = f"{args.mode}, {str(dtype).removeprefix('torch.')}, batch {batch} x seq {args.seq_len}, {gpu_mem / GiB:.1f} GiB cards"
    if scheme is not None:
        head = head_scheme(scheme)
        header += f", {scheme} block linears" + (f", {head} output head" if head else "")
    if args.mode == "lora":
        header += f", LoRA r={args.lora_rank}"
    elif args.mode == "full":
        header += f", AdamW states over {args.data_parallel} data-parallel rank(s)"
    if args.checkpoint_activations and args.mode in ("lora", "full"):
        header += ", activation checkpointing"
    return plan.format_plan(model, rows, gpu_mem, header)


def interrupt(signum, frame) -> None:
    """SIGTERM cleans up like Ctrl-C: partial output files are removed."""
    raise KeyboardInterrupt


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plan:
        print(plan_model(args))
        return
    if args.ckpt_dir is None or (args.out_format == "meta" and args.num_shards is None):
        raise UserError("give --ckpt_dir DIR and --num_shards N, or --out_format hf|gguf (or --plan)")
    dtype = None if args.dtype in (None, "keep") else args.dtype
    if args.out_format == "meta":
        dtype = dtype and parse_dtype(dtype)
    options = {"max_shard_size": args.max_shard_size} if args.out_format == "hf" else {}
    n = args.num_shards or 1
    out_dir = convert(args.ckpt_dir, out_format=args.out_format, num_shards=n, out_dir=args.out_dir, dtype=dtype, force=args.force, verify_output=args.verify, adapter=args.adapter, **options)
    verified = ", verified" if args.verify else ""
    if args.out_format == "meta":
        launcher = "python" if n == 1 else f"torchrun --nproc_per_node {n}"
        print(f"wrote {n} shard{'s' * (n > 1)} to {out_dir}{verified}; run: {launcher} example.py --ckpt_dir {out_dir}")
    elif args.out_format == "hf":
        print(f"wrote a Hugging Face folder to {out_dir}{verified}; load it with transformers.AutoModelForCausalLM.from_pretrained('{out_dir}')")
    else:
        print(f"wrote {out_dir / 'model.gguf'}{verified}; run it with llama.cpp: llama-cli -m {out_dir / 'model.gguf'}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    run_cli(main)
