"""The augment list: every op, built from its config file, changes pixels with its own random parameters
per sample, keeps shape, range and labels (mixup/cutmix mix them as documented), and is the identity at
strength 0; `augment=[...]` composes ops in order and `augment=basic` / `none` keep their behaviour."""

from functools import cache
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
NUM_CLASSES = 10
PIXEL_OPS = ["random_crop", "flips", "rotation", "brightness", "contrast", "blur", "color_jitter", "randaugment",
             "random_erasing"]
MIX_OPS = ["mixup", "cutmix"]
# overrides that make every sample transformed (p=1), so "changes pixels" is certain
ALWAYS = {"blur": ["augment.blur.p=1"], "color_jitter": ["augment.color_jitter.p=1"],
          "random_erasing": ["augment.random_erasing.p=1"], "flips": ["augment.flips.vertical=0.5"]}
# each op's strength knob at zero
ZERO = {"random_crop": ["augment.random_crop.padding=0"],
        "flips": ["augment.flips.horizontal=0", "augment.flips.vertical=0"],
        "rotation": ["augment.rotation.degrees=0"],
        "brightness": ["augment.brightness.strength=0"],
        "contrast": ["augment.contrast.strength=0"],
        "blur": ["augment.blur.sigma_min=0", "augment.blur.sigma_max=0", "augment.blur.p=1"],
        "color_jitter": ["augment.color_jitter.brightness=0", "augment.color_jitter.contrast=0",
                         "augment.color_jitter.saturation=0", "augment.color_jitter.hue=0",
                         "augment.color_jitter.p=1"],
        "randaugment": ["augment.randaugment.num_ops=0"],
        "random_erasing": ["augment.random_erasing.p=0"],
        "mixup": ["augment.mixup.p=0"],
        "cutmix": ["augment.cutmix.p=0"]}


@cache
def augment_config(choice: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"augment={choice}", f"data.num_classes={NUM_CLASSES}", *overrides])


def build(choice: str, *overrides: str):
    return instantiate(augment_config(choice, tuple(overrides)).augment)


def batch(B=16, C=3, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(B, C, size, size, generator=generator)
    targets = torch.arange(B) % NUM_CLASSES
    return images, targets


@pytest.mark.parametrize("op", PIXEL_OPS + MIX_OPS)
def test_op_changes_pixels_keeps_shape_range_and_labels(op):
    torch.manual_seed(0)
    images, targets = batch()
    out, out_targets = build(op, *ALWAYS.get(op, []))(images.clone(), targets)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.3  # many samples changed
    if op in MIX_OPS:
        assert out_targets.shape == (16, NUM_CLASSES)
        torch.testing.assert_close(out_targets.sum(1), torch.ones(16))
        # only the sample's own label and its partner's carry weight
        assert ((out_targets > 0).sum(1) <= 2).all()
    else:
        assert torch.equal(out_targets, targets)


@pytest.mark.parametrize("op", PIXEL_OPS + MIX_OPS)
def test_strength_zero_is_identity(op):
    torch.manual_seed(0)
    images, targets = batch()
    out, out_targets = build(op, *ZERO[op])(images.clone(), targets)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    expected = torch.nn.functional.one_hot(targets, NUM_CLASSES).float() if op in MIX_OPS else targets
    torch.testing.assert_close(out_targets, expected)


@pytest.mark.parametrize("op", PIXEL_OPS)
def test_pixel_ops_draw_parameters_per_sample(op):
    """One image repeated over the batch: per-sample parameters give many different outputs (a single
    draw per call, as torchvision's v2 ops on a batch, would give one)."""
    torch.manual_seed(0)
    image, _ = batch(B=1)
    images = image.repeat(16, 1, 1, 1)
    out, _ = build(op, *ALWAYS.get(op, []))(images, torch.zeros(16, dtype=torch.long))
    distinct = torch.unique(out.flatten(1).mul(1e4).round(), dim=0).shape[0]
    assert distinct >= 3, f"{op}: only {distinct} distinct outputs in a batch of 16"


def constant_batch(B=8):
    """Image i is the constant (i + 1) / (B + 1): each pixel says where it came from."""
    values = (torch.arange(B) + 1.0) / (B + 1)
    return values.view(B, 1, 1, 1).expand(B, 3, 16, 16).clone(), torch.arange(B), values


def test_mixup_soft_targets_equal_the_mixing_weight():
    torch.manual_seed(0)
    images, targets, values = constant_batch()
    out, soft = build("mixup", "augment.mixup.alpha=1.0")(images, targets)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lams = []
    for i in range(8):
        own = soft[i, i]
        partner = [k for k in torch.nonzero(soft[i]).flatten().tolist() if k != i]
        assert len(partner) == 1  # mixed with exactly one other sample
        j = partner[0]
        # the pixel value is lam * v_i + (1 - lam) * v_j: recover lam from the image, compare with the target
        lam_from_pixels = (out[i, 0, 0, 0] - values[j]) / (values[i] - values[j])
        torch.testing.assert_close(lam_from_pixels, own, atol=1e-4, rtol=0)
        torch.testing.assert_close(soft[i, j], 1 - own)
        lams.append(own.item())
    assert len({round(v, 4) for v in lams}) > 4  # one weight per sample, not one per batch


def test_cutmix_soft_targets_equal_the_area_kept():
    torch.manual_seed(1)
    images, targets, values = constant_batch()
    out, soft = build("cutmix")(images, targets)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    shares = []
    for i in range(8):
        own_pixels = torch.isclose(out[i], values[i].expand_as(out[i])).float().mean()
        torch.testing.assert_close(soft[i, i], own_pixels, atol=1e-6, rtol=0)
        others = [k for k in torch.nonzero(soft[i]).flatten().tolist() if k != i]
        if others:  # the pasted box holds exactly the partner's value
            j = others[0]
            pasted = ~torch.isclose(out[i], values[i].expand_as(out[i]))
            assert torch.allclose(out[i][pasted], values[j].expand(int(pasted.sum())))
        shares.append(round(own_pixels.item(), 4))
    assert len(set(shares)) > 3


def test_mix_ops_mix_multi_hot_targets_by_the_same_rule():
    """Multi-label targets: a label both images carry stays 1, a label of one image gets its share."""
    torch.manual_seed(0)
    images, _, values = constant_batch()
    multi_hot = torch.zeros(8, NUM_CLASSES)
    multi_hot[:, 0] = 1  # every image carries label 0
    multi_hot[torch.arange(8), torch.arange(8) + 1] = 1  # and one label of its own
    out, soft = build("mixup")(images, multi_hot)
    torch.testing.assert_close(soft[:, 0], torch.ones(8))
    partner = torch.arange(8).flip(0)  # timm's pairing: sample i with sample B-1-i
    lam = (out[:, 0, 0, 0] - values[partner]) / (values - values[partner])
    torch.testing.assert_close(soft[torch.arange(8), torch.arange(8) + 1], lam, atol=1e-4, rtol=0)


def test_augment_list_composes_ops_in_the_order_given():
    augment = build("[flips,rotation,mixup]", "augment.rotation.degrees=30")
    assert list(augment.ops) == ["flips", "rotation", "mixup"]
    assert augment.ops["rotation"].degrees == 30
    assert list(build("[mixup,flips]").ops) == ["mixup", "flips"]
    assert list(build("[basic,color_jitter]").ops) == ["random_crop", "flips", "color_jitter"]
    torch.manual_seed(0)
    images, targets = batch()
    out, soft = build("[flips,rotation,mixup]")(images, targets)
    assert out.shape == images.shape and soft.shape == (16, NUM_CLASSES)


def test_none_is_the_identity_and_basic_is_pad_crop_flip():
    images, targets = batch(B=8)
    out, out_targets = build("none")(images, targets)
    assert out is images and out_targets is targets

    basic = build("basic")
    assert basic.ops["random_crop"].padding == 4 and basic.ops["flips"].horizontal == 0.5
    torch.manual_seed(0)
    out, out_targets = basic(images, targets)
    assert torch.equal(out_targets, targets)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(8):  # each output is a 16x16 window of the zero-padded image, maybe mirrored
        windows = [padded[i, :, top:top + 16, left:left + 16] for top in range(9) for left in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored, f"sample {i} is not a padded crop of its input"
        flips += mirrored and not plain
    assert 0 < flips < 8  # some mirrored, some not


@pytest.mark.parametrize("op,override", [("rotation", "augment.rotation.degrees=-1"),
                                         ("mixup", "augment.mixup.alpha=0"),
                                         ("randaugment", "augment.randaugment.magnitude=31"),
                                         ("flips", "augment.flips.horizontal=1.5"),
                                         ("blur", "augment.blur.p=-0.1")])
def test_bad_strengths_fail_with_the_key(op, override):
    with pytest.raises(InstantiationException) as failure:
        build(op, override)
    cause = failure.value.__cause__  # what vitsweep.run.job prints as the one-line error
    assert isinstance(cause, ValueError) and str(cause).startswith(override)


def test_hue_needs_rgb():
    jitter = build("color_jitter", "augment.color_jitter.p=1")
    with pytest.raises(ValueError, match="augment.color_jitter.hue=0"):
        jitter(torch.rand(2, 5, 8, 8), torch.zeros(2, dtype=torch.long))  # hue needs RGB


def test_ops_work_on_any_channel_count():
    """Multispectral batches (13 bands): every op but the hue shift runs and keeps the range."""
    torch.manual_seed(0)
    images = torch.rand(8, 13, 16, 16)
    ops = "[random_crop,flips,rotation,brightness,contrast,blur,randaugment,random_erasing,mixup,cutmix]"
    out, soft = build(ops)(images, torch.arange(8))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1 and soft.shape == (8, NUM_CLASSES)
