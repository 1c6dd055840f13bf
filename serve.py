"""OpenAI-compatible server: `torchrun --nproc_per_node N serve.py --ckpt_dir DIR` (or plain `python`).

Serves /v1/completions and /v1/chat/completions (streaming or not), /v1/models and /health on
rank 0 while all N ranks decode the batch together; see README "Serving" and llama/serving/.
"""

import argparse

from llama import cli
from llama.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    cli.add_model_args(parser)
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; beyond them a 503")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter to serve with (ft_main.py's adapter.pt or a PEFT LoRA directory)")
    parser.add_argument("--seed", type=int, default=1, help="torch seed at load; requests without a seed get a random one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at startup)")
    parser.add_argument("--api_key", default=None, help="if set, requests need 'Authorization: Bearer <key>' (401 otherwise)")
    parser.add_argument("--model_name", default=None, help="model id in responses and /v1/models (default: the ckpt_dir name)")
    parser.add_argument("--shutdown_timeout", type=float, default=5.0, help="seconds open requests get to finish after SIGTERM")
    parser.add_argument("--log_level", default="warning", help="uvicorn's log level (info shows every request)")
    return cli.check_args(parser.parse_args(argv))


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from llama.serving.app import main as serve
    except ImportError as err:
        raise UserError(f"serve.py needs the optional extra 'serve' ({err.name} is not installed): pip install -e \".[serve]\"") from None
    serve(args)


if __name__ == "__main__":
    run_cli(main)
