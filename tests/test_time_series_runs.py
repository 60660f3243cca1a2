"""Image time series and metadata from the CLI: a temporal run with metadata resumes exactly and counts the
missing metadata cells in its summary; task=forecasting scores a value h frames ahead in its units and refuses
single images in one line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODEL, read_metrics, read_summary, run_cli

from vitsweep.data.synthetic_series import load_synthetic_series
from vitsweep.data.targets import Values

SERIES = ["data=synthetic_series", "data.source.num_train=64", "data.source.num_val=16", "data.source.num_test=16",
          "data.batch_size=16", *TINY_MODEL, "trainer.progress_bar=false", "viz.enabled_at_end=false", "logger=none"]


@pytest.mark.slow
def test_a_temporal_run_with_metadata_resumes_exactly_and_counts_missing_cells(tmp_path):
    args = [*SERIES, "model/temporal=divided", "model.temporal.time_encoding=dates", "model/metadata=film",
            "data.source.signal=riot", "data.source.metadata_missing=0.2", "trainer.max_epochs=2"]
    run_cli(args, tmp_path / "straight")
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")  # stops after the first step, mid-epoch
    run_cli([*args, f"ckpt_path={tmp_path / 'stopped' / 'run' / 'checkpoints' / 'last.pt'}"], tmp_path / "resumed")
    straight, resumed = read_summary(tmp_path / "straight" / "run"), read_summary(tmp_path / "resumed" / "run")
    assert resumed["steps"] == straight["steps"] == 2 * 64 // 16
    a = torch.load(tmp_path / "straight" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(name.startswith("temporal.") for name in a) and any(name.startswith("metadata.film") for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # the epochs' validations agree; best.pt may not: the stopped run validated when its budget ran out, and a
    # tie with that early score keeps it as the resumed run's best
    def validations(run):
        return [{k: v for k, v in row.items() if k.startswith("val/")} for row in read_metrics(tmp_path / run / "run")
                if "val/loss" in row and row["step"] > 1]
    straight_scores, resumed_scores = validations("straight"), validations("resumed")
    assert len(straight_scores) == len(resumed_scores) == 2
    for epoch_straight, epoch_resumed in zip(straight_scores, resumed_scores):
        assert epoch_resumed == pytest.approx(epoch_straight)

    source = load_synthetic_series(signal="riot", num_train=64, num_val=16, num_test=16, metadata_missing=0.2)
    expected = sum(int(split.metadata.isnan().sum() + (split.categories < 0).sum())
                   for split in (source.train, source.val, source.test))
    assert straight["frames"] == 4 and straight["dates"] is True
    assert straight["metadata"]["columns"] == ["events", "population", "region"]
    assert straight["metadata"]["missing_cells"] == expected > 0
    assert all(math.isfinite(v) for v in straight["metrics"].values())  # no NaN from the missing cells


@pytest.mark.slow
def test_forecasting_scores_a_value_h_frames_ahead_and_refuses_single_images(tmp_path):
    args = [*SERIES, "task=forecasting", "data.source.signal=forecast", "data.source.horizon=2",
            "model/temporal=factorised", "trainer.max_epochs=1", "trainer.monitor=val/rmse"]
    run_cli(args, tmp_path / "value")
    summary = read_summary(tmp_path / "value" / "run")
    assert summary["task"] == "regression" and summary["frames"] == 4
    source = load_synthetic_series(signal="forecast", horizon=2, num_train=64, num_val=16, num_test=16,
                                   targets={"target": Values("target", ["target"])})
    spread = source.test.labels.float().std().item()  # the targets' spread, in pixels
    # regression metrics in the target's units (pixels), not the standardized ones the loss sees
    assert 0.2 * spread < summary["metrics"]["test/rmse"] < 3 * spread, (summary["metrics"], spread)

    proc = run_cli([*args, "data.source.frames=1"], tmp_path / "single", check=False)
    assert proc.returncode == 2
    assert "task=forecasting predicts from a time series, but the data's samples are single images" in proc.stderr
    assert "Traceback" not in proc.stderr
