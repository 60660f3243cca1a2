"""mode=pretrain through `python run.py`: MAE on digits and DINO on 5-band images, what they record and
draw, fine-tuning from them in every task (linear probe included), exact resume, bad options in one
line, and the pretraining-strategy ablation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, read_summary, run_cli

SMALL = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_dim=96", "model.drop_path=0.0",
         "trainer.progress_bar=false", "logger=none", "viz.num_images=2"]
MAE = ["mode=pretrain", "pretrain=mae", "pretrain.decoder_dim=64", "pretrain.decoder_depth=1", *SMALL]
MULTISPECTRAL = ["data=synthetic", "data.in_channels=5", "data.normalization=auto"]
DINO = ["mode=pretrain", "pretrain=dino", "pretrain.out_dim=128", "pretrain.hidden_dim=64", "pretrain.bottleneck_dim=32",
        "pretrain.num_local_crops=2", *MULTISPECTRAL, *SMALL]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """MAE on digits (3 epochs) and DINO on 5-band synthetic images (2 epochs), each with its figures."""
    tmp = tmp_path_factory.mktemp("pretrain")
    run_cli([*MAE, "trainer.max_epochs=3"], tmp / "mae")
    run_cli([*DINO, "trainer.max_epochs=2"], tmp / "dino")
    return {"mae": tmp / "mae" / "run", "dino": tmp / "dino" / "run", "tmp": tmp}


def encoder_tensors(job_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(job_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    return {name[len("encoder."):]: value for name, value in state.items() if name.startswith("encoder.")}


@pytest.mark.slow
def test_mae_records_loss_and_knn_every_epoch_learns_digits_and_draws_reconstructions(runs):
    summary, metrics = read_summary(runs["mae"]), read_metrics(runs["mae"])
    epochs = [m for m in metrics if "val/knn_acc" in m]
    assert [m["epoch"] for m in epochs] == [0, 1, 2]
    assert all({"train/loss", "val/loss", "val/feature_std"} <= m.keys() for m in epochs)
    assert summary["status"] == "completed" and summary["pretrain"] == "mae"
    assert summary["monitor"] == "val/knn_acc" and summary["monitor_mode"] == "max"  # digits have class labels
    assert summary["best_value"] == max(m["val/knn_acc"] for m in epochs)
    assert epochs[-1]["train/loss"] < 0.8 and epochs[-1]["val/loss"] < 0.8  # a zero predictor scores ~1.0
    assert summary["encoder_checkpoint"] == str(runs["mae"] / "checkpoints" / "best.pt")
    assert (runs["mae"] / "figures" / "reconstructions.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dino_on_five_bands_keeps_teacher_student_and_centre_and_draws_attention(runs):
    summary = read_summary(runs["dino"])
    assert summary["status"] == "completed" and summary["pretrain"] == "dino" and summary["monitor"] == "val/knn_acc"
    checkpoint = torch.load(runs["dino"] / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["pretrain"] == {"method": "dino", "encoder_prefix": "encoder."}
    state = checkpoint["model"]
    assert state["encoder.patch_embed.proj.weight"].shape[1] == 5 and "student.cls_token" in state
    assert state["center"].abs().sum() > 0 and int(state["teacher_updates"]) == summary["steps"]
    figures = sorted(path.name for path in (runs["dino"] / "figures").iterdir())
    assert figures == ["attention_00_val0.png", "attention_01_val1.png"]


@pytest.mark.slow
def test_fine_tuning_from_a_pretrain_run_loads_every_encoder_tensor_in_each_task(runs):
    ckpt = runs["dino"] / "checkpoints" / "best.pt"
    encoder = encoder_tensors(runs["dino"])
    run_cli([*MULTISPECTRAL, *SMALL, "trainer.max_epochs=1", "viz.enabled_at_end=false", f"model.pretrained={ckpt}",
             "task=classification,regression,segmentation"], runs["tmp"] / "tasks", multirun=True)
    jobs = sorted((runs["tmp"] / "tasks" / "sweep").glob("[0-9]*"))
    assert len(jobs) == 3
    for job in jobs:
        summary = read_summary(job)
        report = summary["pretrained"]
        assert summary["status"] == "completed", job
        assert report["source"] == str(ckpt) and report["num_missing_encoder"] == 0, report
        assert sorted(report["loaded"]) == sorted(encoder), report  # every encoder tensor, as it was


@pytest.mark.slow
def test_a_linear_probe_trains_the_head_on_the_frozen_pretrained_encoder(runs):
    ckpt = runs["mae"] / "checkpoints" / "best.pt"
    run_cli([*SMALL, "trainer.max_epochs=1", "viz.enabled_at_end=false", f"model.pretrained={ckpt}",
             "model.trainable=head"], runs["tmp"] / "probe")
    job = runs["tmp"] / "probe" / "run"
    weights = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in encoder_tensors(runs["mae"]).items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)
    assert weights["head.weight"].shape == (10, 48) and read_summary(job)["metrics"]["test/acc"] > 0.1


@pytest.mark.slow
def test_a_pretrain_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    args = [*DINO, "trainer.max_epochs=2", "viz.enabled_at_end=false"]
    run_cli(args, tmp_path / "straight")
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")  # stops after the first optimizer step
    stopped = read_summary(tmp_path / "stopped" / "run")
    assert stopped["stopped_by_time"] and stopped["steps"] == 1
    run_cli([*args, f"ckpt_path={tmp_path / 'stopped' / 'run' / 'checkpoints' / 'last.pt'}"], tmp_path / "resumed")
    straight, resumed = (torch.load(tmp_path / name / "run" / "checkpoints" / "last.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] and int(resumed["model"]["teacher_updates"]) == straight["step"]
    for name, value in straight["model"].items():  # student, teacher, heads, centre
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_method", "method_in_train_mode", "mask_ratio", "attention", "trainable",
                                  "monitor"])
def test_bad_pretrain_options_fail_in_one_line(tmp_path, case):
    args, key = {
        "no_method": (["mode=pretrain"], "pretrain=mae or pretrain=dino"),
        "method_in_train_mode": (["pretrain=mae"], "mode=pretrain"),
        "mask_ratio": ([*MAE, "pretrain.mask_ratio=1.0"], "pretrain.mask_ratio=1.0"),
        "attention": ([*MAE, "model/attention=windowed"], "model/attention=full"),
        "trainable": ([*MAE, "model.trainable=head"], "model.trainable"),
        "monitor": ([*DINO, "pretrain.monitor=val/acc"], "pretrain.monitor=val/acc"),
    }[case]
    proc = run_cli([*SMALL, *args], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


@pytest.mark.slow
def test_the_pretraining_ablation_fine_tunes_from_each_start(runs, tmp_path):
    import timm

    # "supervised": a timm ViT state dict of the same shape (offline stand-in for timm:<name> hub weights)
    supervised = tmp_path / "supervised.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=3,
                                 embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0).state_dict(), supervised)
    starts = [f"starts.supervised={supervised}", f"starts.mae={runs['mae'] / 'checkpoints' / 'best.pt'}",
              f"starts.dino={runs['dino'] / 'checkpoints' / 'best.pt'}"]
    run_cli(["experiment=ablation/pretraining", "data=synthetic", *SMALL, "model.mlp_dim=96", "trainer.max_epochs=1",
             "viz.enabled_at_end=false", *starts], tmp_path, multirun=True)
    summaries = [read_summary(job) for job in sorted((tmp_path / "sweep").glob("[0-9]*"))]
    assert [s["status"] for s in summaries] == ["completed"] * 4
    starts_seen = {s.get("pretrained", {}).get("source") for s in summaries}
    assert starts_seen == {None, str(supervised), str(runs["mae"] / "checkpoints" / "best.pt"),
                           str(runs["dino"] / "checkpoints" / "best.pt")}
    for summary in summaries:
        if "pretrained" in summary:  # 1 band (MAE, digits) and 5 bands (DINO) both fitted to the recipe's 3
            assert summary["pretrained"]["num_missing_encoder"] == 0, summary["pretrained"]


@pytest.mark.slow
def test_multispectral_pretrain_then_fine_tune_from_the_cli(tmp_path):
    """6-band images: MAE on the training images, then a fine-tune scored on the held-out test split."""
    bands = ["data=synthetic", "data.in_channels=6", "data.normalization=auto", *SMALL, "trainer.max_epochs=1",
             "viz.enabled_at_end=false"]
    run_cli([*bands, "mode=pretrain", "pretrain=mae", "pretrain.decoder_dim=64", "pretrain.decoder_depth=1"],
            tmp_path / "pretrain")
    ckpt = tmp_path / "pretrain" / "run" / "checkpoints" / "best.pt"
    run_cli([*bands, f"model.pretrained={ckpt}", "model.trainable=all"], tmp_path / "finetune")
    summary = read_summary(tmp_path / "finetune" / "run")
    report = summary["pretrained"]
    assert summary["status"] == "completed" and "test/acc" in summary["metrics"]
    assert report["num_missing_encoder"] == 0 and report["adapted_channels"] == []  # 6 bands in, 6 bands out
    encoder = encoder_tensors(tmp_path / "pretrain" / "run")
    assert encoder["patch_embed.proj.weight"].shape[1] == 6 and sorted(report["loaded"]) == sorted(encoder)
