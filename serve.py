"""OpenAI-compatible server: `torchrun --nproc_per_node N serve.py --ckpt_dir DIR` (or plain `python`).

Serves /v1/completions and /v1/chat/completions (streaming or not), /v1/models and /health on
rank 0 while all N ranks decode the batch together; see README "Serving" and llama/serve.py.
"""

import argparse

from llama.errors import UserError, run_cli
from llama.quantize import add_option, parse_scheme


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default="ckpts/stories260K", help="model directory (Meta: params.json, consolidated.NN.pth; or Hugging Face)")
    parser.add_argument("--tokenizer_path", default=None, help="default: <ckpt_dir>/tokenizer.model, else <ckpt_dir>/original/tokenizer.model")
    parser.add_argument("--max_seq_len", type=int, default=512, help="positions per request (prompt + completion)")
    parser.add_argument("--max_batch_size", type=int, default=4, help="requests decoded together (rows of the KV cache)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; beyond them a 503")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--rope_scaling_factor", type=float, default=None,
                        help="Llama 3.1+: override the RoPE scaling factor the checkpoint states (as in example.py)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter to serve with (ft_main.py's adapter.pt or a PEFT LoRA directory)")
    add_option(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding step (all rows every step; CUDA graphs on GPU)")
    parser.add_argument("--seed", type=int, default=1, help="torch seed at load; requests without a seed get a random one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at startup)")
    parser.add_argument("--api_key", default=None, help="if set, requests need 'Authorization: Bearer <key>' (401 otherwise)")
    parser.add_argument("--model_name", default=None, help="model id in responses and /v1/models (default: the ckpt_dir name)")
    parser.add_argument("--shutdown_timeout", type=float, default=5.0, help="seconds open requests get to finish after SIGTERM")
    parser.add_argument("--log_level", default="warning", help="uvicorn's log level (info shows every request)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    parse_scheme(args.quantize)
    try:
        from llama.serve import main as serve
    except ImportError as err:
        raise UserError(f"serve.py needs the optional extra 'serve' ({err.name} is not installed): pip install -e \".[serve]\"") from None
    serve(args)


if __name__ == "__main__":
    run_cli(main)
