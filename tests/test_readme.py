"""The README's commands, as a new user copies them top to bottom.

- every command of this project's scripts in a ```bash block parses with that script's own parser
  (a renamed or removed option in the README fails here, not in a user's shell);
- consecutive tuning commands write to distinct folders: two `ft_main.py` commands that are not
  `--resume` never share an `--out_dir` (the second would be refused: it holds an earlier run);
- the quick start's two commands are the ones .ci/run runs.
"""

import re
import shlex
import sys

import pytest
from dist_utils import REPO

sys.path.insert(0, str(REPO))  # the scripts at the repo root
import example  # noqa: E402
import example_ft  # noqa: E402
import ft_main  # noqa: E402
import serve  # noqa: E402
import split_model  # noqa: E402

README = (REPO / "README.md").read_text()
SCRIPTS = {"example.py": example, "example_ft.py": example_ft, "ft_main.py": ft_main, "serve.py": serve, "split_model.py": split_model}
DEFAULT_OUT_DIR = {"prompt": "runs/prompt_tuning", "lora": "runs/lora", "full": "runs/full"}


def commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every command line of a ```bash block that runs one of the scripts."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0]) if line.strip() and not line.lstrip().startswith("#") else []
            for i, word in enumerate(words):
                if word in SCRIPTS:
                    args = []
                    for arg in words[i + 1 :]:
                        if arg in ("&&", "|", ";", ">", "2>&1"):
                            break
                        args.append(arg)
                    found.append((word, args))
    return found


COMMANDS = commands()


def test_the_readme_has_commands_for_every_script():
    assert {script for script, _ in COMMANDS} == set(SCRIPTS) and len(COMMANDS) > 30


@pytest.mark.parametrize("script,args", COMMANDS, ids=[f"{s} {' '.join(a)}"[:80] for s, a in COMMANDS])
def test_every_command_parses(script: str, args: list[str]):
    module = SCRIPTS[script]
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    if parser is None:  # the scripts whose parse_args also validates: only the argparse part here
        import argparse

        captured = {}
        real = argparse.ArgumentParser.parse_args

        def capture(self, argv=None, namespace=None):
            captured["args"] = real(self, argv, namespace)
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = capture
        try:
            with pytest.raises(SystemExit) as exit_:
                module.parse_args(args)
        finally:
            argparse.ArgumentParser.parse_args = real
        assert exit_.value.code == 0 and "args" in captured, f"{script} {' '.join(args)}"
    else:
        parser.parse_args(args)


def test_tuning_commands_write_to_distinct_folders():
    seen: dict[str, list[str]] = {}
    for script, args in COMMANDS:
        if script != "ft_main.py" or "--resume" in args or "-h" in args:
            continue
        parsed = ft_main.build_parser().parse_args(args)
        out_dir = parsed.out_dir or DEFAULT_OUT_DIR[parsed.method]
        assert out_dir not in seen, f"ft_main.py {' '.join(args)} writes {out_dir}, as ft_main.py {' '.join(seen[out_dir])} did before it"
        seen[out_dir] = args
    assert len(seen) >= 6


def test_quick_start_and_ci_run_the_same_test_command():
    quick = README[README.index("## Quick start") : README.index("## Inference")]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    install, tests = (b.strip() for b in blocks)
    assert install == "pip install torch==2.13.0 -e . && python example.py"
    assert tests.startswith('pip install -e ".[test]"') and "python -m pytest -q tests" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
