"""Attention maps and rollout are distributions with the right shapes; figures write readable PNGs."""

import matplotlib.image
import pytest
import torch

from vitsweep.model import VisionTransformer
from vitsweep.viz import (
    attention_rollout,
    collect_attentions,
    heatmaps_figure,
    image_to_rgb,
    patch_attention_maps,
    rollout_patch_map,
    save_figure,
    visualize_attention,
)


def tiny_vit(pooling="cls", in_channels=3, image_size=32, num_heads=2):
    return VisionTransformer(image_size=image_size, patch_size=8, in_channels=in_channels, num_classes=4,
                             embed_dim=32, depth=2, num_heads=num_heads, mlp_dim=64, pooling=pooling)


def random_attention(batch, heads, tokens, layers):
    return [torch.randn(batch, heads, tokens, tokens).softmax(dim=-1) for _ in range(layers)]


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_attention_maps_are_distributions_on_the_patch_grid(pooling):
    model = tiny_vit(pooling, image_size=(16, 32), num_heads=4)  # non-square 2x4 grid
    logits, attentions = collect_attentions(model, torch.randn(3, 3, 16, 32))
    tokens = model.num_prefix_tokens + 8
    assert logits.shape == (3, 4) and len(attentions) == 2
    for attn in attentions:
        assert attn.shape == (3, 4, tokens, tokens)
        torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, 4, tokens))
    maps = patch_attention_maps(attentions, model.num_prefix_tokens, model.grid_size)
    assert maps.shape == (3, 2, 4, 2, 4)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 2, 4))


def test_attention_map_puts_each_patch_in_its_grid_cell():
    # the cls token attends to patch k only: the map must light up row k // gw, column k % gw
    grid, prefix = (2, 4), 1
    for k in range(8):
        attn = torch.zeros(1, 1, 9, 9)
        attn[0, 0, :, prefix + k] = 1.0
        maps = patch_attention_maps([attn], prefix, grid)[0, 0, 0]
        expected = torch.zeros(grid)
        expected[k // 4, k % 4] = 1.0
        torch.testing.assert_close(maps, expected)


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.eye(5).expand(2, 5, 5))


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    attentions = random_attention(batch=2, heads=3, tokens=10, layers=4)
    rollout = attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert rollout.shape == (2, 10, 10) and (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 10))


def test_rollout_matches_the_definition_for_two_layers():
    first, second = random_attention(batch=1, heads=2, tokens=6, layers=2)
    eye = torch.eye(6)

    def residual(attn):
        mixed = 0.5 * attn.mean(dim=1) + 0.5 * eye
        return mixed / mixed.sum(dim=-1, keepdim=True)

    torch.testing.assert_close(attention_rollout([first, second]), residual(second) @ residual(first))
    with pytest.raises(ValueError, match="mean, max, min"):
        attention_rollout([first], head_fusion="median")


@pytest.mark.parametrize("prefix", [0, 1])
def test_rollout_patch_map_is_a_distribution(prefix):
    rollout = attention_rollout(random_attention(batch=2, heads=2, tokens=prefix + 6, layers=2))
    maps = rollout_patch_map(rollout, prefix, (2, 3))
    assert maps.shape == (2, 2, 3)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2))


def test_image_to_rgb_band_selection_and_stretch():
    image = torch.randn(6, 8, 8) * 50 + 100  # multispectral-like range, far outside [0, 1]
    rgb = image_to_rgb(image, rgb_bands=(3, 2, 1))
    assert rgb.shape == (8, 8, 3)
    for channel in range(3):  # each shown band stretched to the full range on its own
        assert rgb[..., channel].min() == pytest.approx(0.0) and rgb[..., channel].max() == pytest.approx(1.0)
    grey = image_to_rgb(torch.rand(1, 8, 8))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    with pytest.raises(ValueError, match="rgb_bands"):
        image_to_rgb(image, rgb_bands=(0, 1, 6))


def test_image_to_rgb_undoes_normalization():
    original = torch.rand(3, 8, 8) * 0.8 + 0.1
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalized = (original - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    rgb = image_to_rgb(normalized, mean=mean, std=std)
    torch.testing.assert_close(torch.from_numpy(rgb), original.permute(1, 2, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bands, rgb_bands", [(3, None), (6, (3, 2, 1)), (6, None), (1, None)])
def test_visualize_attention_writes_a_png(tmp_path, bands, rgb_bands):
    model = tiny_vit(in_channels=bands)
    fig = visualize_attention(model, torch.randn(bands, 32, 32), rgb_bands=rgb_bands)
    assert_png(save_figure(fig, tmp_path / f"attention_{bands}.png"))


def test_visualize_attention_titles_and_restores_training_mode(tmp_path):
    model = tiny_vit(pooling="mean").train()
    fig = visualize_attention(model, torch.randn(1, 3, 32, 32), label=2, class_names=["a", "b", "c", "d"], layer=0)
    title = fig.get_suptitle()
    assert "pred: " in title and "true: c" in title
    assert model.training
    assert_png(save_figure(fig, tmp_path / "nested" / "attention.png"))


def test_heatmaps_figure_writes_a_png(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    heatmaps = {"grid": torch.rand(2, 4, 4), "pixels": torch.randn(2, 32, 32)}  # sequential and signed
    fig = heatmaps_figure(images, heatmaps, titles=["first", "second"])
    assert_png(save_figure(fig, tmp_path / "heatmaps.png"))
