"""Launch torchrun jobs from tests: a free port each time, output captured, a time limit; or a script in this process."""

import contextlib
import importlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now (torchrun's --master_port 0 is not portable)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc script args` on CPU (gloo) from the repo root."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def python(script: str | Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python script args` (world size 1) from the repo root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python script args` as run_cli ends it (exit code, stdout, stderr), run in this process from the repo root.

    For bad input refused before any work: a fresh interpreter would spend ~3 s of CPU on imports to print one line.
    (Each script's real process is still run elsewhere: test_cli.py, test_split_model.py, test_refusals.py.)"""
    from llama.errors import run_cli

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: module.main([str(arg) for arg in args]))
        except SystemExit as exit:
            code = exit.code or 0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
