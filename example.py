"""Sharded inference: `python example.py` or `torchrun --nproc_per_node N example.py`.

Loads a Meta or Hugging Face model directory (any shard count) split over the N ranks and
completes prompts, all of them together (more than --max_batch_size wait for a free row). Only
rank 0 prints: each completion in prompt order, the current one as it is generated while the
others run alongside. With --json, stdout holds one JSON object per prompt and nothing else.
"""

import argparse
import json
from dataclasses import dataclass
from typing import Optional

import torch

from llama import cli, distributed
from llama.config import LoadSpec
from llama.errors import UserError, run_cli
from llama.generation import Llama
from llama.sampling import Sampling

DEFAULT_PROMPTS = ["Once upon a time", "Lily and Tom went to the park"]


@dataclass(frozen=True)
class Options:
    """example.py's options, parsed: the model, the sampling, and what to print."""

    spec: LoadSpec
    sampling: Sampling
    threads: Optional[int]
    compile: bool
    as_json: bool


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with example_ft.py."""
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt and nothing else")


def generation_options(args: argparse.Namespace) -> Options:
    return Options(cli.load_spec(args), cli.sampling(args), args.threads, args.compile, args.json)


def parse_args(argv=None) -> tuple[Options, argparse.Namespace]:
    parser = cli.parser(__doc__)
    add_generation_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt to complete (repeatable); default: two story openings")
    parser.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model family's chat format (Llama 2 or 3)")
    parser.add_argument("--system", default=None, help="system prompt for --chat")
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        raise UserError("--system is the system prompt of --chat: add --chat, or drop --system")
    return generation_options(args), args


def build(options: Options) -> Llama:
    """The model the options describe, split over this job's ranks."""
    cli.use_threads(options.threads)
    return Llama.build(options.spec, seed=options.sampling.seed, compile=options.compile)


def show(llm: Llama, texts: list[str], prompt_ids: list[list[int]], options: Options, prefix: Optional[torch.Tensor] = None) -> None:
    """Generate every prompt together; rank 0 prints each result in prompt order (text: the current
    prompt as it is generated; --json: one object per prompt as it completes, in order)."""
    is_main = llm.parallel.is_main
    parts: list[list[str]] = [[] for _ in texts]
    ids: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    current = 0
    pieces = llm.stream(prompt_ids, options.sampling, prefix=prefix)  # a bad prompt fails here, before any output
    if is_main and not options.as_json:
        print(texts[0], end="", flush=True)
    for i, piece in pieces:
        parts[i].append(piece.text)
        ids[i] += piece.ids
        done[i] = piece.finish_reason is not None
        if is_main and i == current and not options.as_json:
            print(piece.text, end="", flush=True)
        while current < len(texts) and done[current]:  # the current prompt is complete: print it, move on
            if is_main:
                end(texts, current, "".join(parts[current]), prompt_ids[current], ids[current], options.as_json)
            current += 1
            if is_main and current < len(texts) and not options.as_json:
                print(texts[current] + "".join(parts[current]), end="", flush=True)


def end(texts: list[str], i: int, text: str, prompt_ids: list[int], ids: list[int], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"prompt": texts[i], "prompt_ids": prompt_ids, "ids": ids, "text": text}), flush=True)
    else:
        print(f"\n{'=' * 40}", flush=True)


def main(argv=None) -> None:
    options, args = parse_args(argv)
    prompts = args.prompt or DEFAULT_PROMPTS
    llm = build(options)
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompt_ids = [llm.chat_tokens(system + [{"role": "user", "content": p}]) for p in prompts]
        else:
            prompt_ids = [llm.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        show(llm, prompts, prompt_ids, options)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
