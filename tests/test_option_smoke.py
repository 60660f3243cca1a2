"""Every model / training / loss / metrics option trains through `python run.py`.

All options run as ONE multirun (one process start): each option is a small `# @package _global_`
file written into a test-only config group `smoke`, found through `hydra.searchpath`, and the sweep
is `+smoke=<every option>`. Each parametrized test then reads its own job's outputs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_RUN, read_metrics, read_summary, run_cli
from omegaconf import OmegaConf

# option -> its config (merged at the root, after everything else)
OPTIONS = {
    "defaults": {},
    "attention_local": {"defaults": [{"override /model/attention": "local"}]},
    "attention_windowed": {"defaults": [{"override /model/attention": "windowed"}],
                           "model": {"depth": 2, "attention": {"window_size": 2}}},  # both shifts
    "attention_sparse_axial": {"defaults": [{"override /model/attention": "sparse"}]},
    "attention_sparse_strided": {"defaults": [{"override /model/attention": "sparse"}],
                                 "model": {"attention": {"pattern": "strided", "stride": 3}}},
    "norm_batchnorm": {"defaults": [{"override /model/norm": "batchnorm"}]},
    "norm_rmsnorm": {"defaults": [{"override /model/norm": "rmsnorm"}]},
    "norm_placement_post": {"model": {"norm_placement": "post"}},
    "pooling_mean": {"model": {"pooling": "mean"}},
    "pos_embed_sincos": {"defaults": [{"override /model/pos_embed": "sincos"}]},
    "pos_embed_none": {"defaults": [{"override /model/pos_embed": "none"}]},
    "dropouts": {"model": {"dropout": 0.1, "attention_dropout": 0.1, "drop_path": 0.1}},
    "image_patch_channels": {"data": {"image_size": 24, "in_channels": 5}, "model": {"patch_size": 8}},
    "conv_stem": {"model": {"conv_stem": [8, 16]}},
    "optimizer_sgd": {"defaults": [{"override /optimizer": "sgd"}]},
    "optimizer_lamb": {"defaults": [{"override /optimizer": "lamb"}]},
    "lr_weight_decay": {"optimizer": {"lr": 5.0e-4, "weight_decay": 0.0}},
    "scheduler_constant": {"defaults": [{"override /scheduler": "constant"}]},
    "scheduler_step": {"defaults": [{"override /scheduler": "step"}], "scheduler": {"decay_epochs": 0.5}},
    "scheduler_onecycle": {"defaults": [{"override /scheduler": "onecycle"}]},
    "gradient_clip_off": {"trainer": {"gradient_clip_val": None}},
    "batch_size_epochs": {"data": {"batch_size": 64}, "trainer": {"max_epochs": 2}},
    "ema": {"trainer": {"ema_decay": 0.9}},
    "loss_focal": {"defaults": [{"override /loss": "focal"}]},
    "loss_bce": {"defaults": [{"override /loss": "bce"}]},
    "label_smoothing": {"loss": {"label_smoothing": 0.1}},
    "class_weights_balanced": {"loss": {"class_weights": "balanced"}},
    "class_weights_list": {"loss": {"class_weights": [1.0, 2.0, 1.0, 0.5]}},
    "multi_label_bce": {"defaults": [{"override /loss": "bce"}], "multi_label": True},
    "multi_label_focal": {"defaults": [{"override /loss": "focal"}], "multi_label": True, "loss": {"alpha": 0.25}},
    "metrics_subset": {"metrics": {"names": ["accuracy", "f1"], "per_class": False}},
    # task objectives (conf/task): each with its heads, loss, metrics and monitor
    "task_regression": {"defaults": [{"override /task": "regression"}], "task": {"loss": "huber"}},
    "task_segmentation": {"defaults": [{"override /task": "segmentation"}]},
    "task_segmentation_pup": {"defaults": [{"override /task": "segmentation"}], "task": {"decoder": "pup"}},
    "task_segmentation_patch": {"defaults": [{"override /task": "segmentation"}],
                                "data": {"label_granularity": "patch"}},
    "task_segmentation_patch_conv_stem": {"defaults": [{"override /task": "segmentation"}],  # labels on the patch grid
                                          "data": {"label_granularity": "patch"}, "model": {"conv_stem": [8, 16]}},
    "task_multi_task": {"defaults": [{"override /task": "multi_task"}],
                        "task": {"weighting": "uncertainty",
                                 "heads": {"riot": {"type": "classification", "column": "riot"},
                                           "crowd": {"type": "regression", "column": "crowd", "loss": "l1"},
                                           "area": {"type": "segmentation", "column": "area", "weight": 0.5}}}},
    "aux_heads": {"task": {"aux_heads": ["deep_supervision", "region", "attention"],
                           "aux": {"region": {"num_classes": "${data.num_classes}"}}}},  # synthetic masks: K classes
    # research controls (issue 9); a 25x25 grid makes local attention run as Halo blocks
    "attention_local_halo": {"defaults": [{"override /model/attention": "local"}], "data": {"image_size": 100}},
    "token_pruning_evit": {"defaults": [{"override /model/token_pruning": "evit"}],
                           "model": {"token_pruning": {"keep_rate": 0.5}}},
    "token_pruning_tome": {"defaults": [{"override /model/token_pruning": "tome"}], "model": {"token_pruning": {"r": 3}}},
    "sharing_all": {"defaults": [{"override /model/sharing": "all"}], "model": {"depth": 3}},
    "sharing_cycle": {"defaults": [{"override /model/sharing": "cycle"}], "model": {"depth": 4}},
    "prompt_shallow": {"defaults": [{"override /model/prompt": "shallow"}],
                       "model": {"prompt": {"length": 4}, "trainable": "prompt+head"}},
    "prompt_deep": {"defaults": [{"override /model/prompt": "deep"}],
                    "model": {"depth": 2, "prompt": {"length": 3}, "trainable": "prompt+head"}},
    "early_exit_confidence": {"defaults": [{"override /model/early_exit": "confidence"}],
                              "model": {"depth": 2, "early_exit": {"threshold": 0.3}}},  # exit after block 0
    "swin": {"defaults": [{"override /model": "swin"}], "data": {"image_size": 32},
             "model": {"embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4]}},
    # bad input: the job fails with its one-line reason, before any training step
    "bad_metric_name": {"metrics": {"names": ["accuracy", "auc"]}},
    "bad_class_weights": {"loss": {"class_weights": [1.0, 2.0]}},
}
EXPECTED_FAILURES = {
    "bad_metric_name": "metrics.names has unknown auc: valid names are accuracy, top5, auroc, precision, recall, f1",
    "bad_class_weights": "loss.class_weights has 2 values but data.num_classes=4",
}
BASE = {"trainer": {"max_epochs": 1}}  # under every option
VIT_BASE = {"model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}}  # TINY_MODEL, under every ViT option
NOT_VIT = {"swin"}  # other model configs: the ViT's keys are not theirs
EMBED = 32  # TINY_MODEL's embed_dim


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    """Run every option in one multirun; returns option name -> job dir."""
    tmp_path = tmp_path_factory.mktemp("option_smoke")
    group_dir = tmp_path / "smoke_conf" / "smoke"
    group_dir.mkdir(parents=True)
    for name, body in OPTIONS.items():
        body = OmegaConf.to_container(OmegaConf.merge(BASE, {} if name in NOT_VIT else VIT_BASE, body))
        (group_dir / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    # command-line values beat the files, so what an option may change lives in BASE, not on the line
    tiny_model_keys = [arg.split("=")[0] for arg in TINY_MODEL]
    tiny_run = [arg for arg in TINY_RUN if arg.split("=")[0] not in ("trainer.max_epochs", *tiny_model_keys)]
    proc = run_cli([f"hydra.searchpath=[file://{tmp_path / 'smoke_conf'}]", f"+smoke={','.join(OPTIONS)}", *tiny_run,
                    "logger=none", "trainer.log_every_n_steps=1"], tmp_path, multirun=True, check=False)
    # the EXPECTED_FAILURES jobs fail, so the sweep exits 1 after running them all (docs/sweeps.md)
    assert proc.returncode == 1 and f"{len(EXPECTED_FAILURES)} of {len(OPTIONS)} jobs did not complete" in proc.stderr, \
        proc.stderr[-3000:]
    jobs = {}
    for summary_path in (tmp_path / "sweep").glob("*/summary.json"):
        overrides = json.loads(summary_path.read_text())["overrides"]
        jobs[next(o.split("=", 1)[1] for o in overrides if o.startswith("+smoke="))] = summary_path.parent
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("option", [name for name in OPTIONS if name not in EXPECTED_FAILURES])
def test_option_trains_through_run_py(sweep, option):
    job_dir = sweep[option]
    summary = read_summary(job_dir)
    assert summary["status"] == "completed", summary["error"]
    assert summary["steps"] > 0 and (job_dir / "checkpoints" / "last.pt").is_file()
    train_losses = [row["train/loss"] for row in read_metrics(job_dir) if "train/loss" in row]
    assert train_losses and all(math.isfinite(loss) for loss in train_losses)
    metrics = summary["metrics"]
    monitor = summary["monitor"]  # each task's own: val/acc, val/rmse, val/miou, val/loss
    assert {"test/loss", monitor, monitor.replace("val/", "test/")} <= set(metrics)
    # the confusion matrix is drawn for single-label classification runs
    single_label = summary["task"] == "classification" and not option.startswith("multi_label")
    assert (job_dir / "confusion_matrix.png").is_file() == single_label
    if option in CHECKS:
        CHECKS[option](sweep, summary)


@pytest.mark.slow
@pytest.mark.parametrize("option", list(EXPECTED_FAILURES))
def test_bad_option_fails_before_training(sweep, option):
    summary = read_summary(sweep[option])
    assert summary["status"] == "failed"
    assert EXPECTED_FAILURES[option] in summary["error"]
    assert not (sweep[option] / "checkpoints").exists()


# ---------------------------------------------------------- what else each option's job must show

def params_vs_defaults(delta: int):
    """num_params moves exactly as the option says (TINY_MODEL: depth 1, so norm1, norm2, final norm)."""
    def check(jobs, summary):
        assert summary["num_params"] - read_summary(jobs["defaults"])["num_params"] == delta
    return check


def lr_first_and_last(first: float, last: float):
    """The lr logged after the first and the last of the 8 steps (optimizer.lr 1e-3 unless set)."""
    def check(jobs, summary):
        trajectory = [row["lr"] for row in read_metrics(Path(summary["job_dir"])) if "lr" in row]
        assert len(trajectory) == 8
        assert trajectory[0] == pytest.approx(first, rel=1e-4) and trajectory[-1] == pytest.approx(last, rel=1e-4)
    return check


def multi_label_metrics(jobs, summary):
    assert "val/acc_top5" not in summary["metrics"] and "val/auroc/class_3" in summary["metrics"]


def ema_in_checkpoint(jobs, summary):
    last = torch.load(Path(summary["job_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.equal(last["model"]["head.weight"], last["raw_model"]["head.weight"])


def steps_and_epochs(jobs, summary):
    assert (summary["steps"], summary["epochs_completed"]) == (2 * (256 // 64), 2)


def only_the_named_metrics(jobs, summary):
    assert set(summary["metrics"]) == {f"{split}/{key}" for split in ("val", "test") for key in ("loss", "acc", "f1")}


def warmup_then(lr: float):  # 1-epoch warmup over the 8 steps from 1e-6, ending at the optimizer's lr
    return lr_first_and_last(1e-6 + (lr - 1e-6) / 8, lr)


def task_metrics(task: str, keys: set[str], pngs: tuple[str, ...] = ()):
    def check(jobs, summary):
        assert summary["task"] == task and keys <= set(summary["metrics"]), sorted(summary["metrics"])
        assert all((Path(summary["job_dir"]) / png).is_file() for png in pngs)
    return check


def trained_aux_heads(jobs, summary):
    weights = torch.load(Path(summary["job_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert {"aux_heads.deep_supervision.fc.weight", "aux_heads.region.fc.weight"} <= set(weights)
    assert "test/acc" in summary["metrics"] and not any("region" in key for key in summary["metrics"])


def tokens_per_layer(expected: list[int]):
    def check(jobs, summary):
        assert summary["tokens_per_layer"] == expected
    return check


def trainable_params(expected: int):
    def check(jobs, summary):
        assert summary["num_trainable_params"] == expected < summary["num_params"]
    return check


BLOCK = 2 * 2 * EMBED + (EMBED * 3 * EMBED + 3 * EMBED) + (EMBED * EMBED + EMBED) + 2 * EMBED * 64 + 64 + EMBED
HEAD = EMBED * 4 + 4


def exit_metrics(jobs, summary):
    """Layer 1's exit and the final head's (layer 2): shares that add up, the mean depth they give."""
    metrics = summary["metrics"]
    for split in ("val", "test"):
        shares = metrics[f"{split}/exit_share/1"], metrics[f"{split}/exit_share/2"]
        assert sum(shares) == pytest.approx(1.0) and {f"{split}/exit_acc/1", f"{split}/exit_acc/2"} <= set(metrics)
        assert metrics[f"{split}/mean_depth"] == pytest.approx(shares[0] + 2 * shares[1])


def swin_checkpoint(jobs, summary):
    weights = torch.load(Path(summary["job_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert "layers.1.downsample.reduction.weight" in weights and weights["head.fc.weight"].shape == (4, 32)


CHECKS = {
    "task_regression": task_metrics("regression", {"val/rmse", "val/mae", "test/r2"}, ("regression_scatter.png",)),
    "task_segmentation": task_metrics("segmentation", {"val/miou", "val/pixel_acc", "test/iou/class_1"}),
    "task_segmentation_pup": task_metrics("segmentation", {"val/miou"}),
    "task_segmentation_patch": task_metrics("segmentation", {"val/miou", "test/pixel_acc"}),
    "task_segmentation_patch_conv_stem": task_metrics("segmentation", {"val/miou", "test/pixel_acc"}),
    "task_multi_task": task_metrics("multi_task", {"val/loss", "val/riot/acc", "val/crowd/rmse", "test/area/miou"},
                                    ("riot_confusion_matrix.png", "crowd_regression_scatter.png")),
    "aux_heads": trained_aux_heads,
    "norm_rmsnorm": params_vs_defaults(-3 * EMBED),  # RMSNorm has no bias
    "norm_batchnorm": params_vs_defaults(0),  # the same affine weight and bias as LayerNorm
    "pooling_mean": params_vs_defaults(-2 * EMBED),  # no cls token, no position for it
    "pos_embed_sincos": params_vs_defaults(-17 * EMBED),  # fixed: a buffer, not parameters
    "pos_embed_none": params_vs_defaults(-17 * EMBED),
    # 8x8 patches of 5 bands instead of 4x4 of 3; a 3x3 grid (+cls) of positions instead of 4x4 (+cls)
    "image_patch_channels": params_vs_defaults(EMBED * (8 * 8 * 5 - 4 * 4 * 3) + EMBED * (10 - 17)),
    # two 3x3 convolutions without bias, each with BatchNorm's weight and bias, then a 1x1 projection from 16
    # channels, in place of the linear projection of 4x4x3 pixels
    "conv_stem": params_vs_defaults(8 * 3 * 9 + 2 * 8 + 16 * 8 * 9 + 2 * 16 + EMBED * 16 - EMBED * 4 * 4 * 3),
    "defaults": warmup_then(1e-3),  # cosine's 1-epoch warmup is all of this 1-epoch run
    "optimizer_sgd": warmup_then(0.05),
    "optimizer_lamb": warmup_then(2e-3),
    "lr_weight_decay": warmup_then(5e-4),
    "scheduler_constant": lr_first_and_last(1e-3, 1e-3),
    "scheduler_step": lr_first_and_last(1e-3, 1e-3 * 0.1 ** 2),  # decay_epochs 0.5: every 4 steps
    "scheduler_onecycle": lr_first_and_last(
        1e-3 / 25 + (1e-3 - 1e-3 / 25) * 0.5 * (1 - math.cos(math.pi / (0.3 * 8 - 1))), 1e-3 / 25 / 1e4),
    "batch_size_epochs": steps_and_epochs,
    "metrics_subset": only_the_named_metrics,
    "multi_label_bce": multi_label_metrics,
    "multi_label_focal": multi_label_metrics,
    "ema": ema_in_checkpoint,
    "token_pruning_evit": tokens_per_layer([17, 1 + 8 + 1]),  # 16 patches -> ceil(16 x 0.5) kept + 1 fused
    "token_pruning_tome": tokens_per_layer([17, 17 - 3]),
    "sharing_all": params_vs_defaults(0),  # 3 layers, the parameters of the defaults' 1
    "sharing_cycle": params_vs_defaults(BLOCK),  # 4 layers cycling 2 blocks: one block more than 1 layer
    "prompt_shallow": trainable_params(4 * EMBED + HEAD),  # length x dim + head
    "prompt_deep": trainable_params(3 * EMBED * 2 + HEAD),  # length x dim x depth + head
    "early_exit_confidence": exit_metrics,
    "swin": swin_checkpoint,
}


@pytest.mark.slow
def test_bad_option_in_a_single_run_is_one_line_and_exit_2(tmp_path):
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "run.py"), *TINY_RUN, "logger=none",
           "loss.class_weights=[1,2]", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: loss.class_weights has 2 values but data.num_classes=4: give one weight per class")
    assert "Traceback" not in proc.stderr
