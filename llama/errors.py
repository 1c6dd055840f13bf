"""User-facing errors: one clear line, no traceback."""

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake in the user's input or files; the message names the problem and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the user needs to know (e.g. the checkpoint to resume from)."""


def is_rank0() -> bool:
    """True on the process that prints (global rank 0, or a plain `python` run)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_cli(main: Callable[[], None]) -> NoReturn:
    """Run a script's main(): a UserError becomes `error: ...` on stderr and exit code 2; Ctrl-C says
    what was kept (exit 130); a reader that closed our stdout (`| head`) ends the run quietly (exit 0)."""
    try:
        main()
        sys.stdout.flush()
    except UserError as err:
        if is_rank0():
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        if is_rank0():
            print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # nothing more can be written; point stdout at /dev/null so the interpreter's own flush at exit is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(0)
