"""The import contract of llama/ (.importlinter): rooms by concern, layered, without cycles.

`lint-imports` (import-linter, on grimp's graph, which counts imports inside functions too) must
keep every contract on the tree as it is, and must break one when an upward import is added, so
the check is known to bite.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "llama", tmp_path / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    return tmp_path


@pytest.mark.slow
def test_contracts_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward, broken", [
    ("files.py", "from llama.formats import open_checkpoint", "Rooms"),          # the core reaching up
    ("formats/hf.py", "from llama.tuning import methods", "Rooms"),              # formats reaching up
    ("serving/app.py", "from llama.tuning import train", "Serving and tuning"),  # across the two top rooms
    ("formats/hf.py", "from llama.formats import convert", "No import cycles"),  # a cycle inside a room
])
def test_an_upward_import_inside_a_function_breaks_a_contract(tmp_path, module, upward, broken):
    root = copy_tree(tmp_path)
    with open(root / "llama" / module, "a") as f:
        f.write(f"\n\ndef _probe():\n    {upward}  # noqa: F401\n")
    result = lint(root)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
