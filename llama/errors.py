"""User-facing errors: one clear line, no traceback."""

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake in the user's input or files; the message names the problem and the fix."""


def is_rank0() -> bool:
    """True on the process that prints (global rank 0, or a plain `python` run)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_cli(main: Callable[[], None]) -> NoReturn:
    """Run a script's main(): a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        if is_rank0():
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if is_rank0():
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
