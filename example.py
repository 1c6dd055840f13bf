"""Sharded inference: `python example.py` or `torchrun --nproc_per_node N example.py`.

Loads a Meta or Hugging Face model directory (any shard count) split over the N ranks and
completes prompts. Only rank 0 prints. With --json, stdout holds one JSON object per prompt and
nothing else.
"""

import argparse
import json

from llama import cli, distributed
from llama.errors import run_cli
from llama.generation import Llama

DEFAULT_PROMPTS = ["Once upon a time", "Lily and Tom went to the park"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    add_generation_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt to complete (repeatable); default: two story openings")
    parser.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model family's chat format (Llama 2 or 3)")
    parser.add_argument("--system", default=None, help="system prompt for --chat")
    return cli.check_args(parser.parse_args(argv))


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with example_ft.py."""
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt and nothing else")


def build(args: argparse.Namespace) -> Llama:
    """The model the shared options describe, split over this job's ranks."""
    return Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size, args.dtype, args.seed,
                       compile=args.compile, rope_scaling=cli.rope_override(args), quantize=args.quantize)


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
    pieces = llm.stream(prompt_ids, cli.sampling_of(args), prefix)
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
    llm = build(args)
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompt_ids = [llm.chat_tokens(system + [{"role": "user", "content": p}]) for p in prompts]
        else:
            prompt_ids = [llm.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        if len(prompts) == 1 and not args.json:
            stream_one(llm, prompts[0], prompt_ids[0], args)
        else:
            results = llm.complete(prompt_ids, cli.sampling_of(args))
            print_results(llm, prompts, results, args.json)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
