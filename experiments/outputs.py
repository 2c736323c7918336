"""The end of every run: its files in the run directory and the same numbers in the tracker."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from experiments.io import save_figure, write_csv, write_json
from experiments.loggers import RunLogger


def finish_run(run_dir: Path, final: dict, rows: list[dict], figure_name: str, figure, logger: RunLogger,
               start: float) -> dict:
    """Write metrics.csv (``rows``), ``<figure_name>.png`` and, last, final.json (the run's "done" marker,
    with ``total_seconds`` since ``start``); log the figure and the final metrics. Returns ``final``."""
    write_csv(run_dir / "metrics.csv", pd.DataFrame(rows))
    save_figure(run_dir / f"{figure_name}.png", figure)
    logger.log_figure(figure_name, figure)
    final["total_seconds"] = round(time.perf_counter() - start, 3)
    write_json(run_dir / "final.json", final)
    logger.log_table("final_metrics", [final])
    return final
