"""The library installs and imports from anywhere, as a new user would use it.

`llama/` once had no `__init__.py`: `find_packages` found nothing, `pip install .` shipped no code and
`import llama` worked only from the repo root. Here a wheel is built from the repo, unpacked into a
temporary site folder, and imported from a directory that is not the repo.
"""

import os
import shutil
import subprocess
import sys
import zipfile

from dist_utils import REPO


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
    for module in ("llama/__init__.py", "llama/model.py", "llama/checkpoint.py", "llama/hf.py", "llama/tokenizer.py"):
        assert module in names, f"{module} missing from {wheel.name}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is a zip laid out as site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    code = "import llama, llama.model, llama.checkpoint, llama.hf, llama.generation; print(llama.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(site)), f"imported {run.stdout.strip()}, not the wheel's copy"
