"""Atomic writers: each result is written to a temporary file beside its target and then renamed over
it (``os.replace``), so an interrupted run never leaves a half-written table, array or figure."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the result ordinary permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, frame) -> None:
    """A pandas DataFrame as CSV (no index)."""
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False)


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def save_figure(path: str | Path, figure, dpi: int = 150) -> None:
    """A matplotlib figure as PNG."""
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
