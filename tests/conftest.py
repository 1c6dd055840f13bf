import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # for dist_utils

from llama import distributed  # noqa: E402


@pytest.fixture
def world1():
    """A world-size-1 process group for in-process model tests; torn down afterwards."""
    parallel = distributed.setup()
    yield parallel
    distributed.teardown()
