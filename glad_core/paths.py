"""Project-local cache directory (weights, demo data, few-shot selections)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache: `$GLAD_CACHE`, else `.cache/glad` under the current working directory's project."""
    env = os.environ.get("GLAD_CACHE")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "glad"
    root.mkdir(parents=True, exist_ok=True)
    return root
