"""Shared pytest setup: makes ``from helpers import ...`` and ``from tests.helpers import ...`` work
whichever way pytest is started."""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
