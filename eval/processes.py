"""Run experiment subprocesses a few at a time (the reproduce scripts' job runner)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_processes(commands: list[list[str]], workers: int) -> None:
    """Run every command as its own process from the repository root, ``workers`` at a time, in order;
    raises ``RuntimeError`` listing the commands that failed once all have finished."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pending, running, failed = list(commands), [], []
    while pending or running:
        while pending and len(running) < workers:
            command = pending.pop(0)
            print("+", " ".join(command[1:]), flush=True)
            running.append((subprocess.Popen(command, cwd=REPO_ROOT), command))
        time.sleep(0.2)
        for proc, command in list(running):
            if proc.poll() is not None:
                running.remove((proc, command))
                if proc.returncode != 0:
                    failed.append(" ".join(command[1:]))
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))
