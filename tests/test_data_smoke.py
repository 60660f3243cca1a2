"""Every input-data option trains for real through `python run.py`: one multirun per data source, each
option a job, each job checked for status completed and at least one optimizer step."""

import numpy as np
import pytest
import tifffile
from conftest import TINY_RUN, read_summary, run_cli

TINY = [o for o in TINY_RUN if not o.startswith("data=")]  # the tiny run, on another data config
AUGMENT_OPS = ["random_crop", "flips", "rotation", "brightness", "contrast", "blur", "color_jitter", "randaugment",
               "random_erasing", "mixup", "cutmix"]
# none, basic, every op in one list (each op trains in it; tests/test_augment.py tests them one by one), and
# mixup alone (soft targets straight into the loss). Four jobs, not fourteen: each job costs seconds here.
AUGMENT_JOBS = ["none", "basic", f"[{','.join(AUGMENT_OPS)}]", "mixup"]
pytestmark = pytest.mark.slow


def jobs_by_override(sweep_dir) -> dict[str, dict]:
    """{"key=value key=value": summary} for each job of a multirun."""
    return {" ".join(s["overrides"]): s for s in map(read_summary, sorted(p.parent for p in
                                                                          sweep_dir.glob("*/summary.json")))}


def completed(summary: dict) -> bool:
    return summary["status"] == "completed" and summary["steps"] >= 1


@pytest.fixture(scope="module")
def augment_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augment")
    run_cli([f"augment={','.join(AUGMENT_JOBS)}", "logger=none", *TINY_RUN], tmp, multirun=True)
    return jobs_by_override(tmp / "sweep")


def augment_ops_of(key: str) -> list[str]:
    choice = next(o for o in key.split() if o.startswith("augment=")).removeprefix("augment=")
    return choice.strip("[]").split(",")


@pytest.mark.parametrize("option", ["none", "basic", *AUGMENT_OPS])
def test_every_augment_option_trains(augment_sweep, option):
    jobs = [s for key, s in augment_sweep.items() if option in augment_ops_of(key)]
    assert jobs and all(completed(job) for job in jobs), [job["error"] for job in jobs]


@pytest.fixture(scope="module")
def strategy_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategy")
    proc = run_cli(["data=digits", "data.batch_size=256", "data.crop_size=12", "data.eval_crop=center,tiled",
                    "model.patch_stride=2", "data.normalization=auto", "data.balance_ratio=0.3", "data.balance_class=1",
                    "data.label_granularity=image,patch", "logger=none", *TINY], tmp, multirun=True, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the label_granularity=patch jobs fail (docs/sweeps.md)
    return jobs_by_override(tmp / "sweep")


@pytest.mark.parametrize("option", ["data.crop_size=12", "data.eval_crop=center", "data.eval_crop=tiled",
                                    "model.patch_stride=2", "data.normalization=auto", "data.balance_ratio=0.3",
                                    "data.label_granularity=image"])
def test_every_data_strategy_option_trains(strategy_sweep, option):
    jobs = [s for key, s in strategy_sweep.items() if option in key.split() and "data.label_granularity=image" in key]
    assert jobs and all(completed(job) for job in jobs), [job["error"] for job in jobs]


def test_patch_labels_with_a_classification_task_fail_with_one_clear_line(strategy_sweep):
    failed = [s for key, s in strategy_sweep.items() if "data.label_granularity=patch" in key.split()]
    assert len(failed) == 2
    for job in failed:
        assert job["status"] == "failed" and "\n" not in job["error"]
        assert job["error"].startswith("ValueError: data.label_granularity=patch: task=classification learns one "
                                       "label per image; patch and pixel labels go with task=segmentation")


def multispectral_tiles(root, bands=5, size=12):
    """Band-first .npy and band-last .tif tiles, uint16, two classes, train and test."""
    rng = np.random.default_rng(0)
    paths = []
    for split, count in (("train", 8), ("test", 4)):
        for label, cls in enumerate(("field", "water")):
            for i in range(count):
                chw = (rng.integers(0, 20000, (bands, size, size)) + 20000 * label).astype(np.uint16)
                path = root / split / cls / f"{i}.{'npy' if i % 2 else 'tif'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, chw) if i % 2 else tifffile.imwrite(path, chw.transpose(1, 2, 0))
                paths.append((path, split, cls))
    return paths


def test_multispectral_imagefolder_trains(tmp_path):
    multispectral_tiles(tmp_path / "tiles")
    run_cli(["data=imagefolder", f"data.root={tmp_path / 'tiles'}", "data.in_channels=5", "data.num_classes=2",
             "data.image_size=8", "data.batch_size=4", "data.normalization=auto", "model.patch_size=4",
             "augment=[flips,rotation,brightness,mixup]", "logger=none", *TINY], tmp_path, multirun=True)
    (job,) = jobs_by_override(tmp_path / "sweep").values()
    assert completed(job), job["error"]
    assert len(job["normalization"]["mean"]) == 5


def test_csv_manifest_with_metadata_trains(tmp_path):
    paths = multispectral_tiles(tmp_path / "tiles")
    lines = ["image,label,split,population"] + [
        f"{path.relative_to(tmp_path)},{cls},{split},{i * 1.5}" for i, (path, split, cls) in enumerate(paths)]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    run_cli(["data=csv", f"data.root={tmp_path / 'manifest.csv'}", "data.in_channels=5", "data.image_size=8",
             "data.crop_size=4", "data.eval_crop=tiled", "data.batch_size=4", "model.patch_size=4", "logger=none",
             *TINY], tmp_path, multirun=True)
    (job,) = jobs_by_override(tmp_path / "sweep").values()
    assert completed(job), job["error"]
