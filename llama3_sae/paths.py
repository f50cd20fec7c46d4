"""Where llama3-sae keeps what it can rebuild: the user cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LLAMA3_SAE_CACHE``, else ``$XDG_CACHE_HOME/llama3-sae``, else ``~/.cache/llama3-sae``."""
    if os.environ.get("LLAMA3_SAE_CACHE"):
        return Path(os.environ["LLAMA3_SAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3-sae"
