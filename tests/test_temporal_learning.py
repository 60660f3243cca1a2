"""The direction a blob moves across T = 4 frames (data=synthetic_series signal=motion), a task that no single
frame and no bag of frames can solve, is learned from the CLI by model/temporal=factorised and divided, and
not by none (the frames' vectors averaged)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_summary, run_cli

from vitsweep.data.synthetic_series import load_synthetic_series

MOTION = ["data=synthetic_series", "data.source.signal=motion", "data.source.num_train=1024",
          "data.source.num_val=128", "data.source.num_test=256", "model=vit", "model.patch_size=4",
          "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64", "model.drop_path=0",
          "optimizer.lr=3e-3", "optimizer.weight_decay=0", "scheduler.warmup_epochs=1", "data.batch_size=32",
          "trainer.max_epochs=8", "trainer.progress_bar=false", "viz.enabled_at_end=false", "logger=none"]


def test_no_single_frame_tells_the_direction():
    """Where the blob is in frame t has the same distribution for both directions (periodic image, uniform
    start), and a left-moving clip is a right-moving one played backwards."""
    split = load_synthetic_series(image_size=16, frames=4, signal="motion", num_train=4096, noise=0.0).train
    columns = split.images.float().mean(dim=(2, 3))  # (N, T, W): the blob's columns light up
    direction = split.labels
    for t in range(4):
        right, left = (columns[direction == label, t].mean(dim=0) for label in (0, 1))
        assert torch.allclose(right, left, atol=0.05 * right.max()), (t, right, left)
    # ... but the order does: the blob's centre moves by +step (right) or -step (left), modulo the width
    weights = torch.exp(2j * torch.pi * torch.arange(16) / 16)
    phase = torch.angle((columns.to(torch.complex64) * weights).sum(-1))  # (N, T) the centre as an angle
    shift = torch.angle(torch.exp(1j * (phase[:, 1:] - phase[:, :-1]))).mean(dim=1)  # (N,) mean step, radians
    assert torch.equal((shift < 0).long(), direction)


@pytest.mark.slow
@pytest.mark.parametrize("temporal", ["factorised", "divided", "none"])
def test_the_direction_of_a_moving_blob_needs_a_temporal_model(tmp_path, temporal):
    run_cli([*MOTION, f"model/temporal={temporal}"], tmp_path)
    accuracy = read_summary(tmp_path / "run")["metrics"]["test/acc"]
    if temporal == "none":
        assert 0.35 < accuracy < 0.65, accuracy  # a bag of frames: chance
    else:
        assert accuracy > 0.9, accuracy
