"""The repository root, the one place it is defined: run directories, committed models (``shapes/prior``,
``toy2d/weights``) and ``results/`` are found relative to it."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> Path:
    """``path`` itself if absolute, else relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path
