"""OpenAI-compatible server: `torchrun --nproc_per_node N serve.py --ckpt_dir DIR` (or plain `python`).

Serves /v1/completions and /v1/chat/completions (streaming or not), /v1/models and /health on
rank 0 while all N ranks decode the batch together; see README "Serving" and llama/serving/.
"""

import importlib.util
import math
from pathlib import Path

from llama import cli
from llama.errors import UserError, run_cli
from llama.files import parse_size

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    cli.add_model_args(parser)
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row (at least 1); beyond them a 503")
    parser.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter to serve with (ft_main.py's adapter.pt or a PEFT LoRA directory)")
    parser.add_argument("--seed", type=int, default=1, help="torch seed at load; requests without a seed get a random one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 0..65535 (0: any free port, printed at startup)")
    parser.add_argument("--api_key", default=None, help="if set, requests need 'Authorization: Bearer <key>' (401 otherwise)")
    parser.add_argument("--model_name", default=None, help="model id in responses and /v1/models (default: the ckpt_dir name)")
    parser.add_argument("--shutdown_timeout", type=float, default=5.0, help="seconds open requests get to finish after SIGTERM (0 or more)")
    parser.add_argument("--log_level", default="warning", choices=LOG_LEVELS, help="uvicorn's log level (info shows every request)")
    parser.add_argument("--max_request_size", default="16MiB", help="largest request body; larger ones get 413 (e.g. 16MiB, 64MB)")
    args = parser.parse_args(argv)
    cli.positive("max_queue", args.max_queue)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise UserError(f"--shutdown_timeout must be 0 or more seconds, got {args.shutdown_timeout}")
    args.max_request_bytes = parse_size(args.max_request_size)
    if args.adapter is not None and not args.adapter.exists():
        raise UserError(f"adapter {args.adapter} not found: pass an adapter.pt file or a PEFT LoRA directory (train one with ft_main.py)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serve.py needs the optional extra 'serve' ({missing[0]} is not installed): pip install -e \".[serve]\"")
    from llama.serving.process import ServeOptions, main as serve

    cli.use_threads(args.threads)
    serve(ServeOptions(spec=cli.load_spec(args), compile=args.compile, adapter=args.adapter, max_queue=args.max_queue, seed=args.seed,
                       host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                       shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, max_request_bytes=args.max_request_bytes))


if __name__ == "__main__":
    run_cli(main)
