"""Sharded inference: `python example.py` or `torchrun --nproc_per_node N example.py`.

Loads any Meta checkpoint (any shard count) split over the N ranks and completes prompts.
Only rank 0 prints. With --json, stdout holds one JSON object per prompt and nothing else.
"""

import argparse
import json

from llama import distributed, quantize
from llama.errors import run_cli
from llama.generation import Llama

DEFAULT_PROMPTS = ["Once upon a time", "Lily and Tom went to the park"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt to complete (repeatable); default: two story openings")
    parser.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model family's chat format (Llama 2 or 3)")
    parser.add_argument("--system", default=None, help="system prompt for --chat")
    return parser.parse_args(argv)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with example_ft.py."""
    parser.add_argument("--ckpt_dir", default="ckpts/stories260K", help="Meta model directory (params.json, consolidated.NN.pth)")
    parser.add_argument("--tokenizer_path", default=None, help="default: <ckpt_dir>/tokenizer.model, else <ckpt_dir>/original/tokenizer.model")
    parser.add_argument("--max_gen_len", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (temperature > 0)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (the same on every rank)")
    parser.add_argument("--max_seq_len", type=int, default=512, help="positions the KV cache holds")
    parser.add_argument("--max_batch_size", type=int, default=4, help="rows the KV cache holds")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt and nothing else")
    parser.add_argument("--rope_scaling_factor", type=float, default=None,
                        help="Llama 3.1+: override the RoPE scaling factor the checkpoint states (Meta's files: 8; HF's 3.2 configs: 32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding step (CUDA graphs on GPU); the first prompts pay the compile time")
    quantize.add_option(parser)


def rope_override(args: argparse.Namespace) -> dict | None:
    """--rope_scaling_factor as an override of the checkpoint's RoPE scaling constants."""
    return {"factor": args.rope_scaling_factor} if args.rope_scaling_factor is not None else None


def print_results(llm: Llama, prompts: list[str], results: list[dict], as_json: bool) -> None:
    """Rank 0 prints each completion, as JSON lines or readable text."""
    if not llm.parallel.is_main:
        return
    for prompt, result in zip(prompts, results):
        if as_json:
            print(json.dumps({"prompt": prompt, "prompt_ids": result["prompt_ids"], "ids": result["ids"], "text": result["text"]}), flush=True)
        else:
            print(f"{prompt}{result['text']}\n{'=' * 40}", flush=True)


def stream_one(llm: Llama, prompt: str, prompt_ids: list[int], args: argparse.Namespace, prefix=None) -> None:
    """Print one completion as it is generated (rank 0); other ranks compute alongside.

    The first piece is computed before anything is printed, so a bad prompt (too long, ...)
    is an error with nothing half-written on stdout.
    """
    pieces = llm.stream(prompt_ids, args.max_gen_len, args.temperature, args.top_p, prefix)
    first = next(pieces, "")
    if llm.parallel.is_main:
        print(prompt + first, end="", flush=True)
    for piece in pieces:
        if llm.parallel.is_main:
            print(piece, end="", flush=True)
    if llm.parallel.is_main:
        print(flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = args.prompt or DEFAULT_PROMPTS
    llm = Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size, args.dtype, args.seed, compile=args.compile,
                      rope_scaling=rope_override(args), quantize=args.quantize)
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompt_ids = [llm.chat_tokens(system + [{"role": "user", "content": p}]) for p in prompts]
        else:
            prompt_ids = [llm.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        if len(prompts) == 1 and not args.json:
            stream_one(llm, prompts[0], prompt_ids[0], args)
        else:
            results = llm.complete(prompt_ids, args.max_gen_len, args.temperature, args.top_p, False, False)
            print_results(llm, prompts, results, args.json)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
