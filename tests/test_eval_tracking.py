"""W&B runs of the toy studies: offline runs inside the study directory, disabled -> nothing written."""
import pandas as pd
import pytest
from matplotlib.figure import Figure

from eval.tracking import records, study_logger
from experiments.loggers import NullLogger


def _frame():
    return pd.DataFrame({"method": ["msd", "sds"], "in_hdr": [1.0, 0.25], "steps": [150, 150]})


def test_records_are_plain_python_rows():
    rows = records(_frame())
    assert rows == [{"method": "msd", "in_hdr": 1.0, "steps": 150}, {"method": "sds", "in_hdr": 0.25, "steps": 150}]
    assert all(type(row["steps"]) is int and type(row["in_hdr"]) is float for row in rows)


def test_study_logger_offline_writes_table_and_figure(tmp_path, monkeypatch):
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = study_logger(tmp_path / "study", "unit-study", {"study": "unit"})
    logger.log_table("metrics", records(_frame()))
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    logger.log_figure("curve", figure)
    logger.finish()
    (run,) = (tmp_path / "study" / "wandb").glob("offline-run-*")
    assert list(run.glob("files/media/table/metrics_*.table.json"))
    assert list(run.glob("files/media/images/curve_*.png"))


def test_study_logger_disabled_and_bad_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert isinstance(study_logger(tmp_path / "off", "x", {}), NullLogger)
    assert not (tmp_path / "off").exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of"):
        study_logger(tmp_path, "x", {})
