import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The test models are tiny: a second intra-op thread costs more than it saves, and on a shared
# 2-core machine spinning OpenMP threads slow every test ~10x (torchrun workers set OMP_NUM_THREADS=1).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and the CLIs called in-process (example.main, ft_main.main) keep it

# torch.compile's C++ kernels and precompiled headers go to a cache of this run's own (inherited by
# the torchrun workers): a machine-wide cache filled under another ATEN_CPU_CAPABILITY serves
# headers that do not match this run's kernels (g++: 'at::vec' has not been declared).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama-mp-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # for dist_utils

from llama import distributed  # noqa: E402


@pytest.fixture
def world1():
    """A world-size-1 process group for in-process model tests; torn down afterwards."""
    parallel = distributed.setup()
    yield parallel
    distributed.teardown()
