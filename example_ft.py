"""Generate with a frozen model + a tuned adapter: `python example_ft.py` or under `torchrun`.

The adapter is a soft prompt (ft_main.py's prompt.pt or a PEFT prompt-tuning directory) or a
LoRA adapter (ft_main.py's adapter.pt or a PEFT LoRA directory, also one trained elsewhere on an
HF Llama). Each --instruction (with the optional --input) is rendered with the training template
(alpaca by default). A soft prompt is placed before it, at positions 0..P-1 of the KV cache (the
cache gets P more positions); a LoRA adapter goes inside the parallel linears, each rank holding
its slices like the base. Only rank 0 prints. With --json, stdout holds one JSON object per
instruction and nothing else.
"""

from dataclasses import replace

from example import add_generation_args, build, generation_options, show
from llama import cli, distributed
from llama.errors import run_cli
from llama.formats import adapters
from llama.tuning import data
from llama.tuning.prompt import check_dim, load_prompt

DEFAULT_INSTRUCTIONS = ["Write a short story about a cat.", "Give three tips for staying healthy."]


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    add_generation_args(parser)
    parser.add_argument("--adapter", default="runs/prompt_tuning/prompt.pt", help="prompt.pt, adapter.pt or a PEFT adapter directory")
    parser.add_argument("--instruction", action="append", help="instruction to answer (repeatable); default: two examples")
    parser.add_argument("--input", default="", help="optional input (context) for every instruction")
    parser.add_argument("--template", default="alpaca", help=f"prompt template used in training: {', '.join(data.TEMPLATES)}")
    parser.add_argument("--no_adapter", action="store_true", help="generate without the adapter, to compare")
    args = parser.parse_args(argv)
    data.check_template(args.template)
    return generation_options(args), args


def main(argv=None) -> None:
    options, args = parse_args(argv)
    instructions = args.instruction or DEFAULT_INSTRUCTIONS
    records = [{"instruction": i, "input": args.input, "output": ""} for i in instructions]
    texts = [data.render(record, args.template)[0] for record in records]
    kind = None if args.no_adapter else adapters.adapter_kind(args.adapter)
    prompt = load_prompt(args.adapter) if kind == "prompt" else None
    if prompt is not None:  # the KV cache holds the soft prompt's rows before every instruction
        options = replace(options, spec=replace(options.spec, max_seq_len=prompt.n_virtual_tokens + options.spec.max_seq_len))
    llm = build(options)
    try:
        prefix = None
        if kind == "lora":
            adapters.apply_adapter(llm.model, args.adapter)
        if prompt is not None:
            check_dim(prompt, llm.model.args.dim, args.adapter)
            prefix = prompt.weight.detach().to(llm.parallel.device)
        prompt_ids = [data.encode(record, llm.tokenizer, args.template)[0] for record in records]
        show(llm, texts, prompt_ids, options, prefix)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
