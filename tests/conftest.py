"""Shared pytest setup: makes ``from helpers import ...`` and ``from tests.helpers import ...`` work
whichever way pytest is started."""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The apps' default decode path (auto) times candidates at the first generation of every new model shape; the
# tests' tiny models would pay it over and over (subprocesses inherit this too). tests/test_decode_paths.py
# exercises auto itself.
os.environ.setdefault("LLAMA3_SAE_DECODE_PATH", "eager")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models run fastest on one, a busy 2-core machine's
    threads otherwise stall each other, and a CPU matmul's rounding depends on the thread count (tests that
    compare bit for bit across processes pin it in the child too). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
