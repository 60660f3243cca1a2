"""Explanations: every method gives a finite heatmap per image, IG is complete, the Grad-CAM glue
computes Grad-CAM on the token grid, and the figure writes a readable PNG."""

import matplotlib.image
import pytest
import torch

from vitsweep.model import create_vit
from vitsweep.viz import explanation_figure
from vitsweep.viz.explain import (
    EXPLAINERS,
    explain,
    gradcam,
    integrated_gradients,
    lime,
    patch_feature_mask,
    to_patch_grid,
)
from vitsweep.viz.figures import save_figure


def tiny_vit(pooling="cls", in_channels=3, **overrides):
    torch.manual_seed(0)
    args = {"image_size": 32, "patch_size": 8, "in_channels": in_channels, "num_classes": 4, "embed_dim": 32,
            "depth": 2, "num_heads": 2, "mlp_dim": 64, "pooling": pooling}
    args.update(overrides)
    return create_vit(**args).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_method_gives_a_finite_patch_heatmap(pooling):
    model = tiny_vit(pooling).train()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    heatmaps = explain(model, images, targets, list(EXPLAINERS))
    assert set(heatmaps) == set(EXPLAINERS)
    for method, heatmap in heatmaps.items():
        assert heatmap.shape == (2, 4, 4), method
        assert torch.isfinite(heatmap).all() and heatmap.abs().sum() > 0, method
    assert model.training  # explain runs in eval mode and restores the flag


def test_pixel_methods_keep_pixels_when_asked():
    model = tiny_vit()
    heatmaps = explain(model, torch.randn(2, 3, 32, 32), None, ["saliency", "ig", "gradcam"], per_patch=False)
    assert heatmaps["saliency"].shape == (2, 32, 32) and heatmaps["ig"].shape == (2, 32, 32)
    assert heatmaps["gradcam"].shape == (2, 4, 4)


def test_unknown_method_fails_with_the_valid_names():
    with pytest.raises(ValueError) as error:
        explain(tiny_vit(), torch.randn(1, 3, 32, 32), [0], ["saliency", "occlusion"])
    message = str(error.value)
    assert "\n" not in message and "occlusion" in message
    assert all(name in message for name in EXPLAINERS)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_integrated_gradients_completeness(pooling):
    model = tiny_vit(pooling)
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    attributions, delta = integrated_gradients(model, images, targets, n_steps=64)
    with torch.no_grad():
        rows = torch.arange(3)
        difference = model(images)[rows, targets] - model(torch.zeros_like(images))[rows, targets]
    tolerance = 1e-3 * difference.abs().max().item() + 1e-5
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), difference, atol=tolerance, rtol=0)
    assert delta.abs().max() <= tolerance
    # summing pixels into patch tokens keeps the total: completeness holds per token map too
    token_map = to_patch_grid(attributions.sum(dim=1), model)
    torch.testing.assert_close(token_map.sum(dim=(1, 2)), attributions.sum(dim=(1, 2, 3)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_gradcam_glue_computes_gradcam_on_the_token_grid(pooling):
    model = tiny_vit(pooling)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    cam = gradcam(model, images.clone(), targets)

    # by hand: tokens entering the last block, their gradient, ReLU(sum_d mean_grad_d * token_d)
    captured = {}

    def keep_tokens(module, args):
        captured["tokens"] = args[0]

    handle = model.blocks[-1].register_forward_pre_hook(keep_tokens)
    logits = model(images)
    handle.remove()
    tokens = captured["tokens"]  # (B, N, D)
    grads = torch.autograd.grad(logits[torch.arange(2), targets].sum(), tokens)[0][:, model.num_prefix_tokens:]
    patches = tokens[:, model.num_prefix_tokens:]  # (B, P, D)
    weights = grads.mean(dim=1, keepdim=True)  # (B, 1, D): mean over the grid
    expected = torch.relu((weights * patches).sum(dim=-1)).reshape(2, *model.grid_size)
    torch.testing.assert_close(cam, expected.detach(), atol=1e-6, rtol=1e-4)
    assert len(model.blocks[-1]._forward_pre_hooks) == 0  # the glue removes its hook


def test_cls_logits_ignore_the_patch_tokens_leaving_the_last_block():
    # why Grad-CAM taps the tokens entering the last block: leaving it, patches have no gradient
    model = tiny_vit("cls")
    captured = {}
    handle = model.blocks[-1].register_forward_hook(lambda module, args, out: captured.update(tokens=out[0]))  # (tokens, sizes)
    logits = model(torch.randn(1, 3, 32, 32))
    handle.remove()
    grads = torch.autograd.grad(logits[0, 0], captured["tokens"])[0]  # (1, N, D)
    assert grads[:, 1:].abs().max() == 0 and grads[:, 0].abs().max() > 0


def test_gradcam_works_with_a_frozen_trunk():
    model = tiny_vit(trainable="head")
    cam = explain(model, torch.randn(2, 3, 32, 32), [0, 1], ["gradcam"])["gradcam"]
    assert cam.shape == (2, 4, 4) and torch.isfinite(cam).all()


def test_lime_patch_superpixels():
    model = tiny_vit(image_size=(16, 32))  # 2x4 grid
    mask = patch_feature_mask(model, 16, 32)
    assert mask.shape == (1, 1, 16, 32)
    counts = torch.bincount(mask.flatten())
    assert counts.tolist() == [64] * 8  # 8 patches of 8x8 pixels
    assert mask[0, 0, 8, 24] == 7 and mask[0, 0, 0, 8] == 1  # row-major like the token order
    scores = lime(model, torch.randn(2, 3, 16, 32), torch.tensor([0, 1]), n_samples=32)
    assert scores.shape == (2, 2, 4) and torch.isfinite(scores).all()


@pytest.mark.parametrize("bands, rgb_bands", [(3, None), (6, (3, 2, 1))])
def test_explanation_figure_writes_a_png(tmp_path, bands, rgb_bands):
    model = tiny_vit(in_channels=bands)
    fig = explanation_figure(model, torch.randn(2, bands, 32, 32), methods=["saliency", "ig", "gradcam", "rollout"],
                             labels=[1, 2], class_names=["a", "b", "c", "d"], rgb_bands=rgb_bands)
    path = save_figure(fig, tmp_path / "explain.png")
    assert path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0]  # a row of 5 panels per image
