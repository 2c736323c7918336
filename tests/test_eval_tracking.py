"""W&B runs of the toy studies: offline runs inside the study directory with the study's group, job type and tags;
disabled -> nothing written."""
import pandas as pd
import pytest
import wandb
from matplotlib.figure import Figure

from eval.tracking import records, study_logger
from experiments.loggers import NullLogger
from tests.test_loggers import read_offline_run


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
    logger = study_logger(tmp_path / "study", "unit-study", {"study": "landscapes", "denoiser": "exact"})
    logger.log_table("metrics", records(_frame()))
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    logger.log_figure("curve", figure)
    logger.finish()
    (run,) = (tmp_path / "study" / "wandb").glob("offline-run-*")
    assert list(run.glob("files/media/table/metrics_*.table.json"))
    assert list(run.glob("files/media/images/curve_*.png"))
    wandb.teardown()  # the W&B service closes the run files
    logged = read_offline_run(run)
    assert (logged.group, logged.job_type) == ("toy2d", "landscapes")
    assert logged.tags == ("study", "task:toy2d", "denoiser:exact") and logged.keys == {"metrics", "curve"}


def test_study_logger_disabled_and_bad_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert isinstance(study_logger(tmp_path / "off", "x", {"study": "table4", "prior": "shapes"}), NullLogger)
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match=r"config\['study'\] must be one of \('toy2d_grid', 'gradient_quality'"):
        study_logger(tmp_path, "x", {"study": "unit"})
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of"):
        study_logger(tmp_path, "x", {"study": "table4"})
