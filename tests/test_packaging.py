"""The library installs and imports from anywhere, as a new user would use it.

`llama/` once had no `__init__.py`: `find_packages` found nothing, `pip install .` shipped no code and
`import llama` worked only from the repo root. Here a wheel is built from the repo, unpacked into a
temporary site folder, and imported from a directory that is not the repo.
"""

import pytest
import os
import shutil
import subprocess
import sys
import zipfile

from dist_utils import REPO


@pytest.mark.slow
def test_wheel_ships_the_package_and_imports_outside_the_repo(tmp_path):
    source = tmp_path / "src"  # a copy, so setuptools' build/ folder never lands in (or stales) the repo
    shutil.copytree(REPO / "llama", source / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", source)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("llama_mp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    rooms = ("llama/formats/__init__.py", "llama/formats/hf.py", "llama/tuning/train.py", "llama/serving/app.py", "llama/kernels/linear.py")
    for module in ("llama/__init__.py", "llama/model.py", "llama/tokenizer.py", *rooms):
        assert module in names, f"{module} missing from {wheel.name}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is a zip laid out as site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    # the public entry points and a module of each room
    code = ("from llama import Llama; from llama.generation import Llama; from llama.model import ModelArgs, Transformer; "
            "from llama.engine import Engine; from llama.formats.load import load_model; from llama.formats import open_checkpoint; "
            "from llama.kernels.linear import Int8Linear; from llama.tuning.prompt import SoftPrompt; import llama.formats.plan; print(llama.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(site)), f"imported {run.stdout.strip()}, not the wheel's copy"
