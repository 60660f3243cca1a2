"""model=swin: timm's Swin Transformer for any image size and band count, window sizes that suit
32 px inputs, weights from timm or files fitted to the model, figures where they apply (one-line
refusals where they need a flat ViT token sequence), and the whole harness through `python run.py`:
train, exact resume, eval, sweeps."""

from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import read_summary, run_cli
from hydra.utils import instantiate
from test_config import composed

from vitsweep.model.pretrained import PretrainedLoadError
from vitsweep.model.swin import create_swin
from vitsweep.viz.report import FigureReport

TINY = {"embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4]}
TINY_ARGS = ["model=swin", "model.embed_dim=16", "model.depths=[2,2]", "model.num_heads=[2,4]"]


def swin(**kwargs):
    torch.manual_seed(0)
    return create_swin(**{"image_size": 32, "in_channels": 3, "num_classes": 10, "patch_size": 2, "window_size": 4,
                          **TINY, **kwargs})


def test_the_config_builds_windows_that_suit_32_px_inputs():
    model = instantiate(composed(["model=swin", "data=synthetic", "data.image_size=32", "data.num_classes=10"]).model)
    stages = [(tuple(stage.blocks[0].input_resolution), stage.blocks[0].window_size[0], stage.blocks[1].shift_size[0])
              for stage in model.layers]
    # 16x16 patches in windows of 4 (shifted by 2 in odd blocks), then 8x8 the same, then 4x4: one window
    assert stages == [((16, 16), 4, 2), ((8, 8), 4, 2), ((4, 4), 4, 0)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10) and model.grid_size == (16, 16)
    assert "SwinTransformer" in model.summary() and "16x16 (window 4" in model.summary()


@pytest.mark.parametrize("image_size,in_channels", [(32, 3), (28, 1), (24, 5), (40, 13)])
def test_any_image_size_and_band_count(image_size, in_channels):
    model = swin(image_size=image_size, in_channels=in_channels, num_classes=7)
    logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert model.patch_embed.proj.in_channels == in_channels


def test_bad_stage_shapes_fail_with_the_key():
    with pytest.raises(ValueError, match=r"model.depths=\[2, 2\] and model.num_heads=\[2\]"):
        swin(depths=[2, 2], num_heads=[2])
    with pytest.raises(ValueError, match=r"model.num_heads\[1\]=3 does not divide stage 1's width 32"):
        swin(num_heads=[2, 3])


def test_weights_from_a_file_are_fitted_to_window_bands_and_classes(tmp_path):
    source = swin(window_size=4)
    torch.save(source.state_dict(), tmp_path / "swin.pth")  # timm's names: a timm Swin state dict
    model = swin(image_size=24, in_channels=5, num_classes=3, window_size=3, pretrained=str(tmp_path / "swin.pth"))
    report = model.load_report
    assert any(entry.startswith("layers.0.blocks.0.attn.relative_position_bias_table (49, 2) -> (25, 2)")
               for entry in report.resampled)  # (2 x 4 - 1)² -> (2 x 3 - 1)² relative positions
    assert report.adapted_channels == ["patch_embed.proj.weight 3 -> 5 bands"]
    assert report.reinitialized == ["head.fc.weight (10 -> 3 classes)", "head.fc.bias (10 -> 3 classes)"]
    torch.testing.assert_close(model.layers[1].blocks[0].mlp.fc1.weight, source.layers[1].blocks[0].mlp.fc1.weight)
    # a run's own checkpoint loads exactly, and trainable freezes the rest
    torch.save({"model": source.state_dict(), "config": {}}, tmp_path / "best.pt")
    same = swin(pretrained=str(tmp_path / "best.pt"), trainable="head+norm+last_block")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same.eval()(images), source.eval()(images))
    trainable = {name for name, p in same.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("head.", "norm.", "layers.1.blocks.1.")) for name in trainable)


def test_weights_that_do_not_fit_fail_with_one_line(tmp_path, monkeypatch):
    torch.save(swin(embed_dim=8, num_heads=[2, 4]).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(PretrainedLoadError, match=r"does not fit model=swin .*match model.embed_dim"):
        swin(pretrained=str(tmp_path / "narrow.pth"))
    torch.save({"cls_token": torch.zeros(1, 1, 16)}, tmp_path / "vit.pth")
    with pytest.raises(PretrainedLoadError, match=r"holds no Swin weights"):
        swin(pretrained=str(tmp_path / "vit.pth"))
    # timm:NAME offline (an empty cache): one line that says how to pass a file instead
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedLoadError) as error:
        swin(pretrained="timm:swin_tiny_patch4_window7_224")
    assert "\n" not in str(error.value) and "model.pretrained=timm:swin_tiny_patch4_window7_224" in str(error.value)
    assert "model.pretrained=/path/to/swin_tiny_patch4_window7_224.pth" in str(error.value)


def test_figures_that_need_a_flat_token_sequence_are_refused_in_one_line(tmp_path):
    model = swin()
    for methods in (["rollout"], ["ig", "gradcam"]):
        with pytest.raises(ValueError, match=r"viz.explain=.* needs every patch token in every layer, but "
                                             r"SwinTransformer merges patches .*: pick from saliency, ig, shap, lime"):
            FigureReport(explain=methods).check(model)
    report = FigureReport()  # explain=auto: what applies to the model
    report.check(model)
    assert report.methods_for(model) == ["ig"]
    figures = report.write(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), None, tmp_path)
    assert list(figures) == ["viz/explanations"] and figures["viz/explanations"].stat().st_size > 0
    FigureReport(explain=["saliency", "lime"]).check(model)


@pytest.mark.slow
def test_swin_trains_resumes_exactly_and_evaluates_through_run_py(tmp_path):
    args = [*TINY_ARGS, "data=synthetic", "data.image_size=32", "trainer.max_epochs=2", "trainer.progress_bar=false",
            "logger=none", "viz.num_images=2", "model.dropout=0.1"]
    run_cli(args, tmp_path / "straight")
    straight_dir = tmp_path / "straight" / "run"
    summary = read_summary(straight_dir)
    assert summary["status"] == "completed" and summary["metrics"]["test/acc"] > 0.5
    assert (straight_dir / "figures" / "explanations.png").is_file()  # viz.explain=auto: ig, on Swin
    assert not list((straight_dir / "figures").glob("attention_*.png"))
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")  # stops after the first step, mid-epoch
    run_cli([*args, f"ckpt_path={tmp_path / 'stopped' / 'run' / 'checkpoints' / 'last.pt'}"], tmp_path / "resumed")
    straight, resumed = (torch.load(tmp_path / run / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
                         for run in ("straight", "resumed"))
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=1e-6, msg=name)
    run_cli([*args, "mode=eval", f"ckpt_path={straight_dir / 'checkpoints' / 'best.pt'}"], tmp_path / "eval")
    evaluated = read_summary(tmp_path / "eval" / "run")
    assert evaluated["metrics"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_swin_refuses_rollout_before_training(tmp_path):
    proc = run_cli([*TINY_ARGS, "data=synthetic", "data.image_size=32", "logger=none", "viz.explain=[rollout]"],
                   tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "viz.explain=['rollout']: rollout needs every patch token in every layer" in error
    assert not (Path(tmp_path) / "run" / "checkpoints").exists()
