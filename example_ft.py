"""Generate with a frozen model + a tuned adapter: `python example_ft.py` or under `torchrun`.

The adapter is a soft prompt (ft_main.py's prompt.pt or a PEFT prompt-tuning directory) or a
LoRA adapter (ft_main.py's adapter.pt or a PEFT LoRA directory, also one trained elsewhere on an
HF Llama). Each --instruction (with the optional --input) is rendered with the training template
(alpaca by default). A soft prompt is placed before it, at positions 0..P-1 of the KV cache; a
LoRA adapter goes inside the parallel linears, each rank holding its slices like the base.
Only rank 0 prints. With --json, stdout holds one JSON object per instruction and nothing else.
"""

import argparse

from example import add_generation_args, print_results, rope_override, stream_one
from llama import data, distributed, lora, quantize
from llama.errors import run_cli
from llama.generation import Llama
from llama.prompt_tuning import check_dim, load_prompt

DEFAULT_INSTRUCTIONS = ["Write a short story about a cat.", "Give three tips for staying healthy."]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(parser)
    parser.add_argument("--adapter", default="runs/prompt_tuning/prompt.pt", help="prompt.pt, adapter.pt or a PEFT adapter directory")
    parser.add_argument("--instruction", action="append", help="instruction to answer (repeatable); default: two examples")
    parser.add_argument("--input", default="", help="optional input (context) for every instruction")
    parser.add_argument("--template", default="alpaca", help=f"prompt template used in training: {', '.join(data.TEMPLATES)}")
    parser.add_argument("--no_adapter", action="store_true", help="generate without the adapter, to compare")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    data.check_template(args.template)
    instructions = args.instruction or DEFAULT_INSTRUCTIONS
    records = [{"instruction": i, "input": args.input, "output": ""} for i in instructions]
    texts = [data.render(record, args.template)[0] for record in records]
    quantize.parse_scheme(args.quantize)
    kind = None if args.no_adapter else lora.adapter_kind(args.adapter)
    prompt = load_prompt(args.adapter) if kind == "prompt" else None
    llm = Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size, args.dtype, args.seed, compile=args.compile,
                      rope_scaling=rope_override(args), quantize=args.quantize)
    try:
        prefix = None
        if kind == "lora":
            lora.apply_adapter(llm.model, args.adapter)
        if prompt is not None:
            check_dim(prompt, llm.model.args.dim, args.adapter)
            prefix = prompt.weight.detach().to(llm.parallel.device)
            llm.model.setup_caches(args.max_batch_size, prompt.n_virtual_tokens + args.max_seq_len)  # room for the prefix
        prompt_ids = [data.encode(record, llm.tokenizer, args.template)[0] for record in records]
        if len(texts) == 1 and not args.json:
            stream_one(llm, texts[0], prompt_ids[0], args, prefix)
            return
        results = llm.complete(prompt_ids, args.max_gen_len, args.temperature, args.top_p, prefix=prefix)
        print_results(llm, texts, results, args.json)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
