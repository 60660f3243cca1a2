"""model.conv_stem: 3x3 stride-2 convolutions (BatchNorm, ReLU) and a 1x1 projection in place of the linear
patch embedding (Xiao et al. 2021). Each token keeps its place on the patch grid and sees its own patch plus a
border of its neighbours' pixels, no more; the pixel geometry the rest of the harness reads (patch labels,
explanations, MAE's pixel targets, DINO's crops) stays the patch's; the FLOPs count the stem; bad settings and
timm weights are refused in one line; and a run trains, saves and restores it from the command line."""

import pytest
import torch
from conftest import TINY_RUN, read_summary, run_cli
from test_cost import hand_count
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitsweep.model import VisionTransformer
from vitsweep.model.pretrained import PretrainedLoadError, convert_timm_state_dict, load_pretrained
from vitsweep.model.vit import patch_pixels
from vitsweep.pretrain.mae import MaskedAutoencoder
from vitsweep.trainer.cost import forward_flops


def tiny(**kw):
    args = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 5, "embed_dim": 32, "depth": 1,
            "num_heads": 4, "mlp_dim": 64, "conv_stem": [8, 16]}
    return VisionTransformer(**{**args, **kw})


def pixels_seen_by(model, row: int, col: int) -> torch.Tensor:
    """(H, W) bool: the pixels whose values move token (row, col) of the patch embedding (eval mode)."""
    model.eval()
    images = torch.randn(4, model.in_channels, *model.patch_embed.image_size, requires_grad=True)
    grid = model.patch_embed.grid(images)  # (B, D, gh, gw)
    grid[:, :, row, col].square().sum().backward()
    return images.grad.abs().sum(dim=(0, 1)) > 0


@pytest.mark.parametrize("patch,stem", [(4, [8, 16]), (8, [4, 8, 16])])
def test_a_token_sees_its_patch_and_a_border_of_its_neighbours(patch, stem):
    """Two (three) 3x3 stride-2 convolutions: the receptive field of token i spans pixels
    patch * i - (patch - 1) .. patch * i + patch - 1, its own patch and patch - 1 pixels before it."""
    torch.manual_seed(0)
    model = tiny(image_size=4 * patch, patch_size=patch, conv_stem=stem)
    assert model.grid_size == (4, 4)
    seen = pixels_seen_by(model, 1, 2)
    rows = torch.zeros(4 * patch, dtype=torch.bool)
    rows[1:2 * patch] = True  # patch * 1 - (patch - 1) .. patch * 1 + patch - 1
    cols = torch.zeros(4 * patch, dtype=torch.bool)
    cols[patch + 1:3 * patch] = True  # patch * 2 - (patch - 1) .. patch * 2 + patch - 1
    torch.testing.assert_close(seen, rows[:, None] & cols[None, :])

    plain = pixels_seen_by(tiny(image_size=4 * patch, patch_size=patch, conv_stem=[]), 1, 2)
    own_patch = torch.zeros(4 * patch, 4 * patch, dtype=torch.bool)
    own_patch[patch:2 * patch, 2 * patch:3 * patch] = True
    torch.testing.assert_close(plain, own_patch)  # the linear embedding: the patch alone


def test_the_stem_keeps_the_grid_and_the_pixel_geometry_of_its_patches():
    model = tiny(image_size=(16, 24), in_channels=5)
    assert model.grid_size == (4, 6) and model.patch_embed.num_patches == 24
    assert patch_pixels(model.patch_embed) == ((4, 4), (4, 4))
    assert model.patch_embed.flattened_patch_dim == 4 * 4 * 5
    assert model(torch.randn(2, 5, 16, 24)).shape == (2, 5)
    names = {name for name, _ in model.named_parameters()}
    assert {"patch_embed.stem.0.weight", "patch_embed.stem.1.weight", "patch_embed.stem.3.weight",
            "patch_embed.proj.weight"} <= names
    assert model.patch_embed.proj.kernel_size == (1, 1)  # after the stem, a 1x1 projection
    # an MAE on it predicts the patches' pixels, all bands
    mae = MaskedAutoencoder(model, mask_ratio=0.5, decoder_dim=16, decoder_depth=1)
    assert mae.decoder_pred.out_features == 4 * 4 * 5


def test_the_flop_count_adds_the_stem_convolutions():
    dim, mlp = 16, 32
    plain = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=5, embed_dim=dim, depth=2,
                              num_heads=2, mlp_dim=mlp)
    stem = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=5, embed_dim=dim, depth=2,
                             num_heads=2, mlp_dim=mlp, conv_stem=[8, 12])
    linear_patch_embed = 2 * 16 * dim * 3 * 4 * 4
    stem_convs = (2 * 8 * 8 * 8 * 3 * 9  # 3 -> 8 channels, 3x3, on the 8x8 map
                  + 2 * 4 * 4 * 12 * 8 * 9  # 8 -> 12, 3x3, on the 4x4 map
                  + 2 * 4 * 4 * dim * 12)  # 12 -> dim, 1x1
    trunk = hand_count(16, 4, 4, 3, dim, 2, mlp, 5, cls_token=True) - linear_patch_embed
    assert forward_flops(plain, (3, 16, 16)) == trunk + linear_patch_embed
    assert forward_flops(stem, (3, 16, 16)) == trunk + stem_convs


@pytest.mark.parametrize("kwargs,value", [
    ({"conv_stem": [8]}, "model.conv_stem=[8]"),  # one halving: 2 px patches, not 4
    ({"conv_stem": [8, 16, 32]}, "model.conv_stem=[8, 16, 32]"),
    ({"conv_stem": [8, 16], "patch_stride": 2}, "model.conv_stem=[8, 16]"),  # overlapping patches and a stem
    ({"conv_stem": [0, 16]}, "model.conv_stem=[0, 16]"),
])
def test_a_stem_that_does_not_make_the_patches_fails_with_the_key(kwargs, value):
    with pytest.raises(ValueError) as error:
        tiny(**kwargs)
    message = str(error.value)
    assert value in message and "\n" not in message
    assert "model.patch_size" in message or "at least 1" in message


def test_timm_weights_are_refused_into_a_stem_before_any_download():
    model = tiny()
    timm_model = TimmViT(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.0)
    with pytest.raises(PretrainedLoadError, match=r"model.conv_stem=\[8, 16\]: set model.conv_stem=\[\]"):
        convert_timm_state_dict(timm_model.state_dict(), model)
    # the hub is not asked: the refusal comes first, whatever the network
    with pytest.raises(PretrainedLoadError, match=r"model.pretrained=timm:vit_tiny_patch16_224 .*model.conv_stem"):
        load_pretrained(model, "timm:vit_tiny_patch16_224")


def test_a_run_trains_and_restores_the_stem_from_the_command_line(tmp_path):
    run_cli([*TINY_RUN, "model.conv_stem=[4,8]", "trainer.max_epochs=2", "data.batch_size=16", "logger=none"],
            tmp_path / "train")
    trained = tmp_path / "train" / "run"
    summary = read_summary(trained)
    state = torch.load(trained / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert state["patch_embed.stem.0.weight"].shape == (4, 3, 3, 3)
    assert state["patch_embed.proj.weight"].shape[-2:] == (1, 1)
    assert state["patch_embed.stem.1.num_batches_tracked"] > 0  # BatchNorm kept running statistics
    assert summary["cost"]["params"] == sum(v.numel() for k, v in state.items()
                                            if "running_" not in k and "num_batches" not in k)

    # evaluation rebuilds it from the checkpoint's config and scores the same test accuracy
    run_cli(["mode=eval", "data=synthetic", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}", "logger=none"],
            tmp_path / "eval")
    evaluated = read_summary(tmp_path / "eval" / "run")
    assert evaluated["metrics"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    assert evaluated["metrics"]["test/loss"] == pytest.approx(summary["metrics"]["test/loss"], rel=1e-5)
