import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: a second intra-op thread costs more than it saves, and on a shared
# 2-core machine spinning OpenMP threads slow every test ~10x (torchrun workers set OMP_NUM_THREADS=1).
torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # for dist_utils

from llama import distributed  # noqa: E402


@pytest.fixture
def world1():
    """A world-size-1 process group for in-process model tests; torn down afterwards."""
    parallel = distributed.setup()
    yield parallel
    distributed.teardown()
