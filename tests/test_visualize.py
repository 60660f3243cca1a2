"""Figures of what the ViT attends to and why it decides: at the end of training (logged to W&B and
TensorBoard) and by mode=visualize, for image files or the first images of a split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, TINY_RUN, read_summary, run_cli

from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run
from vitsweep.model import VisionTransformer
from vitsweep.viz.explain import EXPLAINERS
from vitsweep.viz.report import FigureReport, read_image_file

NUM_IMAGES = 3
FIGURES_ON = ["viz.enabled_at_end=true", f"viz.num_images={NUM_IMAGES}"]  # TINY_RUN turns them off


def assert_readable_pngs(paths) -> None:
    for path in paths:
        path = Path(path)
        assert path.suffix == ".png" and path.stat().st_size > 0, path
        pixels = matplotlib.image.imread(path)  # (H, W, 3 or 4) floats in [0, 1]
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, (path, pixels.shape)
        assert pixels.std() > 0, f"{path} is a blank image"


def figure_pngs(job_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((job_dir / "figures").glob("*.png"))}


# --------------------------------------------------------------------------------- end of training

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with end-of-training figures, logged to an offline W&B run."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = run_cli([*TINY_RUN, *FIGURES_ON, "logger=wandb"], tmp)
    return tmp, tmp / "run", proc


@pytest.mark.slow
def test_end_of_training_writes_attention_and_explanation_pngs(trained):
    _, job_dir, proc = trained
    pngs = figure_pngs(job_dir)
    assert sorted(pngs) == [f"attention_{i:02d}_val{i}.png" for i in range(NUM_IMAGES)] + ["explanations.png"]
    assert_readable_pngs(pngs.values())
    # one row per image in the explanation figure, one column per method (+ the input): taller than wide
    explanations = matplotlib.image.imread(pngs["explanations.png"])
    assert explanations.shape[0] > 0.5 * explanations.shape[1]
    assert f"figures: {NUM_IMAGES + 1} PNGs" in proc.stdout
    assert read_summary(job_dir)["status"] == "completed"


@pytest.mark.slow
def test_end_of_training_figures_are_images_in_the_wandb_run(trained):
    _, job_dir, _ = trained
    [wandb_file] = find_offline_runs(job_dir)
    run = read_offline_run(wandb_file)
    assert run.finished and run.exit_code == 0
    # wandb 0.31 records a wandb.Image in history as {"_type": "image-file", "path": "media/images/...",
    # "sha256", "width", "height", "format"}; the PNG itself is copied under the run's files/
    logged = {key: value for row in run.history for key, value in row.items()
              if isinstance(value, dict) and value.get("_type") == "image-file"}
    expected = {f"viz/attention_{i:02d}": f"attention_{i:02d}_val{i}.png" for i in range(NUM_IMAGES)}
    expected["viz/explanations"] = "explanations.png"
    assert set(expected) <= set(logged), sorted(logged)
    for key, filename in expected.items():
        image, source = logged[key], job_dir / "figures" / filename
        assert (wandb_file.parent / "files" / image["path"]).is_file() and image["format"] == "png"
        assert image["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # the very PNG written
        assert (image["height"], image["width"]) == matplotlib.image.imread(source).shape[:2]


# ---------------------------------------------------------------------------------- mode=visualize

@pytest.fixture(scope="module")
def visualized(trained, tmp_path_factory):
    """mode=visualize of the trained run's best.pt: on two image files, and on the test split."""
    _, job_dir, _ = trained
    tmp = tmp_path_factory.mktemp("visualize")
    ckpt = job_dir / "checkpoints" / "best.pt"
    files = []
    for i, size in enumerate((40, 23)):  # other sizes than the model's 16 px: they are resized
        path = tmp / f"photo {i}.png"  # a space in the name: the figure names are sanitized
        rgb = np.random.default_rng(i).random((size, size + 5, 3)).astype(np.float32)
        matplotlib.image.imsave(path, rgb)
        files.append(path)
    common = [*TINY_MODEL, "data=synthetic", "mode=visualize", f"ckpt_path={ckpt}"]
    from_files = run_cli([*common, "logger=none", f"viz.images=[{','.join(repr(str(f)) for f in files)}]"],
                         tmp / "files")
    from_test = run_cli([*common, "logger=wandb", "viz.split=test", "viz.num_images=2", "viz.explain=[rollout]"],
                        tmp / "test")
    return {"files": (tmp / "files" / "run", from_files), "test": (tmp / "test" / "run", from_test)}


@pytest.mark.slow
def test_visualize_image_files(visualized):
    job_dir, proc = visualized["files"]
    pngs = figure_pngs(job_dir)
    assert sorted(pngs) == ["attention_00_photo_0.png", "attention_01_photo_1.png", "explanations.png"]
    assert_readable_pngs(pngs.values())
    summary = read_summary(job_dir)
    assert summary["status"] == "completed" and summary["mode"] == "visualize"
    assert set(summary["figures"]) == {"viz/attention_00", "viz/attention_01", "viz/explanations"}
    assert "epoch 0" not in proc.stdout  # nothing is trained


@pytest.mark.slow
def test_visualize_test_split_and_log_the_images(visualized):
    job_dir, _ = visualized["test"]
    pngs = figure_pngs(job_dir)
    assert sorted(pngs) == ["attention_00_test0.png", "attention_01_test1.png", "explanations.png"]
    assert_readable_pngs(pngs.values())
    run = read_offline_run(find_offline_runs(job_dir)[0])
    logged = {key for row in run.history for key, value in row.items()
              if isinstance(value, dict) and value.get("_type") == "image-file"}
    assert logged == {"viz/attention_00", "viz/attention_01", "viz/explanations"}
    assert run.exit_code == 0


# ------------------------------------------------------------------ multispectral, TensorBoard, bad input

@pytest.mark.slow
def test_multispectral_figures_and_tensorboard_images(tmp_path):
    run_cli([*TINY_RUN, *FIGURES_ON, "data.in_channels=6", "viz.rgb_bands=[3,4,5]", "logger=tensorboard",
             "viz.explain=[rollout,saliency]"], tmp_path)
    job_dir = tmp_path / "run"
    pngs = figure_pngs(job_dir)
    assert len(pngs) == NUM_IMAGES + 1
    assert_readable_pngs(pngs.values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["images"])
    assert {"viz/attention_00", "viz/explanations"} <= tags, tags
    [image] = events.Images("viz/explanations")
    assert (image.height, image.width) == matplotlib.image.imread(pngs["explanations.png"]).shape[:2]


@pytest.mark.slow
@pytest.mark.parametrize("args,names", [
    ([*TINY_RUN, "viz.explain=[rollout,nope]"], ["viz.explain", "nope", ", ".join(EXPLAINERS)]),
    ([*TINY_RUN, "viz.layer=1"], ["viz.layer=1", "1-layer model"]),
    ([*TINY_RUN, "mode=visualize"], ["mode=visualize", "ckpt_path"]),
])
def test_bad_viz_input_fails_with_one_line_before_training(tmp_path, args, names):
    proc = run_cli([*args, "logger=none"], tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(name in errors[0] for name in names), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "epoch 0" not in proc.stdout and not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------- the report itself

def tiny_model(in_channels: int = 3, pooling: str = "cls") -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, in_channels=in_channels, num_classes=3, embed_dim=32,
                             depth=2, num_heads=2, mlp_dim=64, pooling=pooling)


def test_report_rejects_bad_options_naming_the_key():
    with pytest.raises(ValueError, match=r"viz\.explain=.*nope.*saliency, ig, gradcam, shap, lime, rollout"):
        FigureReport(explain=["ig", "nope"])
    with pytest.raises(ValueError, match=r"viz\.split='dev'"):
        FigureReport(split="dev")
    with pytest.raises(ValueError, match=r"viz\.num_images=0"):
        FigureReport(num_images=0)
    with pytest.raises(ValueError, match=r"viz\.rgb_bands=\[0, 1\]"):
        FigureReport(rgb_bands=[0, 1])
    # what depends on the model is checked against it (before training, and again before drawing)
    with pytest.raises(ValueError, match=r"viz\.layer=2 is out of range for a 2-layer model"):
        FigureReport(layer=2).write(tiny_model(), torch.rand(1, 3, 16, 16), None, None, Path("/nonexistent"))
    FigureReport(layer=-2, rgb_bands=[5, 0, 2]).check(tiny_model(in_channels=6))
    with pytest.raises(ValueError, match=r"viz\.rgb_bands=\[3, 4, 5\] must be band indices in 0\.\.2"):
        FigureReport(rgb_bands=[3, 4, 5]).check(tiny_model())
    with pytest.raises(FileNotFoundError, match=r"viz\.images: no such file /nonexistent\.png"):
        FigureReport(images=["/nonexistent.png"]).check(tiny_model())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_report_writes_one_png_per_image_and_one_for_the_batch(tmp_path, pooling):
    report = FigureReport(explain=["rollout", "gradcam"], layer=0)
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    figures = report.write(tiny_model(pooling=pooling), images, labels, ["a", "b", "c"], tmp_path,
                           mean=[0.5] * 3, std=[0.5] * 3, names=["x", "y"])
    assert figures == {"viz/attention_00": tmp_path / "attention_00_x.png",
                       "viz/attention_01": tmp_path / "attention_01_y.png",
                       "viz/explanations": tmp_path / "explanations.png"}
    assert_readable_pngs(figures.values())


def test_report_without_explanations_and_with_multi_hot_labels(tmp_path):
    figures = FigureReport(explain=[]).write(tiny_model(), torch.randn(2, 3, 16, 16),
                                             torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), None, tmp_path)
    assert sorted(figures) == ["viz/attention_00", "viz/attention_01"]  # multi-hot labels: titles show pred only
    assert_readable_pngs(figures.values())


def test_read_image_file_converts_channels_and_resizes(tmp_path):
    path = tmp_path / "rgb.png"
    rgb = np.zeros((30, 20, 3), dtype=np.float32)
    rgb[..., 0] = 1.0  # pure red
    matplotlib.image.imsave(path, rgb)
    image = read_image_file(str(path), in_channels=3, image_size=16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.ones(16, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(image[1:], torch.zeros(2, 16, 16), atol=1e-3, rtol=0)
    grey = read_image_file(str(path), in_channels=1, image_size=[8, 12])
    assert grey.shape == (1, 8, 12) and 0.1 < grey.mean() < 0.5  # red's luminance
    with pytest.raises(ValueError, match=r"data\.in_channels=6"):
        read_image_file(str(path), in_channels=6, image_size=16)
    with pytest.raises(FileNotFoundError, match=r"viz\.images: no such file"):
        read_image_file(str(tmp_path / "missing.png"), in_channels=3, image_size=16)
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match=r"viz\.images: .*not a readable image"):
        read_image_file(str(tmp_path / "not_an_image.png"), in_channels=3, image_size=16)
