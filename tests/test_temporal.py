"""Image time series (model/temporal): what each option does with the frames, that one frame is the image
model, that augmentation draws once per sample, and the time encodings."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from vitsweep.augment.compose import Compose
from vitsweep.augment.erasing import RandomErasing
from vitsweep.augment.geometric import Flips, RandomCrop, Rotation
from vitsweep.augment.mix import CutMix, Mixup
from vitsweep.augment.photometric import Brightness
from vitsweep.data.datamodule import DataModule
from vitsweep.data.inputs import Inputs
from vitsweep.data.synthetic_series import load_synthetic_series
from vitsweep.model.clip import Clip
from vitsweep.model.hooks import TrunkPass
from vitsweep.model.temporal import DividedSpaceTime, FactorisedEncoder, FrameAverage, TimeEncoding
from vitsweep.model.vit import VisionTransformer

SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 3, "embed_dim": 32, "depth": 2,
         "num_heads": 2, "mlp_dim": 64}
TEMPORAL = {"none": FrameAverage, "factorised": FactorisedEncoder, "divided": DividedSpaceTime}


def model(temporal: str, **options) -> VisionTransformer:
    return VisionTransformer(**{**SHAPE, **options}, temporal=partial(TEMPORAL[temporal])).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("temporal", list(TEMPORAL))
def test_one_frame_is_the_image_model_with_the_same_weights(temporal, pooling):
    torch.manual_seed(0)
    image_model = VisionTransformer(**SHAPE, pooling=pooling).eval()
    clip_model = model(temporal, pooling=pooling)
    missing, unexpected = clip_model.load_state_dict(image_model.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("temporal.") for name in missing)
    images = torch.randn(6, 3, 16, 16)
    for batch in (images[:, None], Inputs(images[:, None], dates=torch.full((6, 1), 18500.0))):
        assert torch.equal(clip_model(batch), image_model(images))  # T = 1: bit for bit
    assert torch.equal(clip_model(images), image_model(images))  # images are one frame too


def test_none_averages_the_frames_and_is_blind_to_their_order():
    torch.manual_seed(0)
    none = model("none")
    frames = torch.randn(4, 5, 3, 16, 16)
    per_frame = torch.stack([none.forward_head(none.forward_features(frames[:, t]), pre_logits=True)
                             for t in range(5)], dim=1)  # (B, T, D)
    torch.testing.assert_close(none(frames), none.head(per_frame.mean(dim=1)))
    torch.testing.assert_close(none(frames), none(frames.flip(1)))


@pytest.mark.parametrize("temporal", ["factorised", "divided"])
def test_factorised_and_divided_see_the_order_of_the_frames(temporal):
    torch.manual_seed(0)
    clip_model = model(temporal)
    if temporal == "divided":  # its temporal projection starts at zero (TimeSformer); give it weights
        for layer in clip_model.temporal.layers:
            torch.nn.init.normal_(layer.attn.proj.weight, std=0.1)
    frames = torch.randn(4, 5, 3, 16, 16)
    forward, backward = clip_model(frames), clip_model(frames.flip(1))
    assert (forward - backward).abs().max() > 1e-3 * forward.abs().max()  # float noise is ~1e-7 of it


def test_divided_starts_with_frames_apart_but_for_their_time_encoding():
    torch.manual_seed(0)
    divided = model("divided")
    frames = torch.randn(2, 3, 3, 16, 16)
    # temporal attention adds zero at init: a frame's tokens depend on its own pixels only
    with torch.no_grad():
        changed = frames.clone()
        changed[:, 0] = torch.randn(2, 3, 16, 16)
        images, clip = divided.read_inputs(frames)
        tokens = divided.forward_features(images, clip=clip).view(2, 3, -1, 32)
        images, clip = divided.read_inputs(changed)
        tokens_changed = divided.forward_features(images, clip=clip).view(2, 3, -1, 32)
    assert torch.equal(tokens[:, 1:], tokens_changed[:, 1:]) and not torch.equal(tokens[:, 0], tokens_changed[:, 0])


def test_divided_mixes_only_the_same_token_position_across_frames():
    torch.manual_seed(0)
    divided = DividedSpaceTime(dim=8, depth=1, num_heads=2)
    for parameter in divided.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    tokens = torch.randn(2 * 3, 5, 8, requires_grad=True)  # B=2 samples, T=3 frames, N=5 tokens
    out = divided.before_block(0, tokens, TrunkPass(Clip(frames=3))).view(2, 3, 5, 8)
    out[0, 1, 2].sum().backward()  # sample 0, frame 1, token 2
    reaches = tokens.grad.view(2, 3, 5, 8).abs().sum(dim=-1) > 0  # (B, T, N)
    assert reaches[0, :, 2].all() and reaches.sum() == 3  # token 2 of every frame of sample 0, nothing else


def test_dates_encode_the_offsets_from_the_first_date_and_unknown_dates_stay_finite():
    torch.manual_seed(0)
    encoding = TimeEncoding(16, "dates", num_frequencies=4, max_period_days=400)
    dates = torch.tensor([[18500.0, 18530.0, 18590.0], [19000.0, 19030.0, 19090.0], [18500.0, 18560.0, 18590.0]])
    encoded = encoding(Clip(frames=3, dates=dates), 3)
    torch.testing.assert_close(encoded[0], encoded[1])  # the same offsets (0, 30, 90 days), two years apart
    assert not torch.allclose(encoded[0], encoded[2])  # other offsets
    with_unknown = encoding(Clip(frames=3, dates=torch.tensor([[float("nan"), 18530.0, 18590.0]])), 1)
    assert torch.isfinite(with_unknown).all()
    torch.testing.assert_close(with_unknown[0, 0], encoding.unknown)
    with pytest.raises(ValueError, match="time_encoding=dates but the samples have no dates"):
        encoding(Clip(frames=3), 3)
    with pytest.raises(ValueError, match="more than model.temporal.max_frames=2: raise it"):
        TimeEncoding(16, "learned", max_frames=2)(Clip(frames=3), 1)
    with pytest.raises(ValueError, match="time_encoding='days' is not one of: learned, dates"):
        TimeEncoding(16, "days")


@pytest.mark.parametrize("temporal", ["factorised", "divided"])
def test_a_model_with_dates_trains_from_them(temporal):
    torch.manual_seed(0)
    clip_model = VisionTransformer(**SHAPE, temporal=partial(TEMPORAL[temporal], time_encoding="dates"))
    frames = torch.randn(2, 3, 3, 16, 16)
    dates = torch.tensor([[18500.0, 18520.0, 18600.0], [18500.0, float("nan"), 18540.0]])
    out = clip_model(Inputs(frames, dates=dates))
    out.sum().backward()
    assert torch.isfinite(out).all() and clip_model.temporal.time.proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- frames through the data


def repeated_frames(batch=6, frames=4):
    """Each sample's frames identical: after augmentation they must still be identical."""
    torch.manual_seed(1)
    image = torch.rand(batch, 1, 3, 16, 16)
    return image.expand(-1, frames, -1, -1, -1).contiguous()


@pytest.mark.parametrize("op", [Flips(horizontal=0.5, vertical=0.5), Rotation(degrees=40), RandomCrop(padding=4),
                                RandomErasing(p=1.0), Brightness(strength=0.5), Mixup(num_classes=3),
                                CutMix(num_classes=3)], ids=lambda op: type(op).__name__)
def test_every_frame_of_a_sample_gets_the_same_draw(op):
    frames = repeated_frames()
    labels = torch.arange(6) % 3
    out, _ = Compose(op=op)(frames, labels)
    assert out.shape == frames.shape
    for t in range(1, 4):
        assert torch.equal(out[:, t], out[:, 0])
    assert not torch.equal(out, frames)  # it did augment
    # and the one draw per sample is what the op draws for the first frame alone, from the same RNG state
    torch.manual_seed(5)
    alone, alone_targets = Compose(op=op)(frames[:, 0], labels)
    torch.manual_seed(5)
    together, together_targets = Compose(op=op)(frames, labels)
    assert torch.equal(together[:, 0], alone) and torch.equal(together_targets, alone_targets)


def test_inputs_keep_their_metadata_and_dates_through_augmentation():
    frames = repeated_frames()
    inputs = Inputs(frames, numeric=torch.randn(6, 2), categories=torch.arange(6)[:, None], dates=torch.rand(6, 4))
    out, _ = Compose(op=Flips(horizontal=1.0))(inputs, torch.zeros(6, dtype=torch.long))
    assert torch.equal(out.images, frames.flip(-1))
    assert out.numeric is inputs.numeric and out.categories is inputs.categories and out.dates is inputs.dates
    assert out.shape == frames.shape and len(out) == 6


def test_datamodule_batches_time_series_with_crops_shared_by_the_frames_of_a_sample():
    source = load_synthetic_series(image_size=16, frames=3, num_train=64, num_val=16, num_test=16)
    data = DataModule(source, image_size=16, in_channels=3, num_classes=2, batch_size=8, crop_size=12,
                      normalization="auto", eval_crop="tiled")
    batch, labels = next(iter(data.train_batches(epoch=0, seed=0)))
    assert isinstance(batch, Inputs) and batch.images.shape == (8, 3, 3, 12, 12) and batch.dates.shape == (8, 3)
    assert batch.numeric.shape == (8, 2) and batch.categories.shape == (8, 1) and labels.shape == (8,)
    # the crop of every frame of a sample is at one place: find it in frame 0, it holds for frames 1 and 2
    order = data.epoch_order(0, 0)[:8]
    stored = data.to_float(source.train.images[order])
    for i in range(8):
        hits = [(top, left) for top in range(5) for left in range(5)
                if torch.equal(stored[i, 0, :, top:top + 12, left:left + 12], batch.images[i, 0])]
        top, left = hits[0]
        assert all(torch.equal(stored[i, t, :, top:top + 12, left:left + 12], batch.images[i, t]) for t in (1, 2))
    views, _ = next(iter(data.eval_batches("val", all_views=True)))
    assert views.images.shape == (16 * 4, 3, 3, 12, 12) and views.numeric.shape == (64, 2)
    assert torch.equal(views.numeric[:4], source.val.metadata[:1].expand(4, -1))  # each view has its sample's
    assert len(data.mean.flatten()) == 3 and data.normalize(batch).images.shape == batch.images.shape
    summary = data.input_summary()
    assert summary["frames"] == 3 and summary["dates"] is True


def test_resize_keeps_frames_apart():
    source = load_synthetic_series(image_size=16, frames=2, num_train=32, num_val=8, num_test=8)
    data = DataModule(source, image_size=16, in_channels=3, num_classes=2, batch_size=8, resize_to=24)
    batch, _ = next(iter(data.train_batches(epoch=0, seed=0)))
    assert batch.images.shape == (8, 2, 3, 24, 24)
    frame = torch.nn.functional.interpolate(data.to_float(source.train.images[data.epoch_order(0, 0)[:8], 1]),
                                            size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(batch.images[:, 1], frame)


def test_clip_helpers_move_between_samples_and_frames():
    clip = Clip(frames=3)
    values = torch.arange(6.0).view(2, 3)  # (B, ...)
    per_frame = clip.per_frame(values)  # (B * T, ...)
    assert per_frame.shape == (6, 3) and torch.equal(per_frame[:3], values[:1].expand(3, -1))
    assert torch.equal(clip.frame_mean(per_frame), values)
    assert math.isclose(float(clip.by_sample(per_frame).sum()), float(values.sum() * 3))


@pytest.mark.parametrize("temporal,tubelet_size", [("none", 1), ("factorised", 1), ("factorised", 2), ("divided", 1),
                                                   ("divided", 2)])
def test_attention_over_frames_gives_a_map_per_frame_and_weights_that_sum_to_one(temporal, tubelet_size, tmp_path):
    """With tubelets (3 frames: tubelets (0, 1) and (2, 2)), each frame shows its tubelet's map and weight."""
    from vitsweep.viz.figures import save_figure
    from vitsweep.viz.frames import frame_attention, frames_figure

    torch.manual_seed(0)
    clip_model = VisionTransformer(**SHAPE, temporal=partial(TEMPORAL[temporal], tubelet_size=tubelet_size)).eval()
    frames = torch.randn(2, 3, 3, 16, 16)
    outputs, maps, weights = frame_attention(clip_model, frames)
    torch.testing.assert_close(outputs, clip_model(frames))
    assert maps.shape == (2, 3, 4, 4) and weights.shape == (2, 3)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    if temporal == "none":  # a plain mean of the frames
        torch.testing.assert_close(weights, torch.full((2, 3), 1 / 3))
    if tubelet_size == 2:  # frames 0 and 1 share a tubelet
        assert torch.equal(maps[:, 0], maps[:, 1]) and torch.equal(weights[:, 0], weights[:, 1])
    figure = frames_figure(frames, maps, weights, ["a", "b"])
    assert save_figure(figure, tmp_path / "frames.png").stat().st_size > 0


@pytest.mark.parametrize("temporal", ["factorised", "divided"])
def test_tubelets_stack_consecutive_frames_and_pad_the_last(temporal):
    torch.manual_seed(0)
    clip_model = VisionTransformer(**SHAPE, temporal=partial(TEMPORAL[temporal], tubelet_size=2)).eval()
    assert clip_model.patch_embed.proj.in_channels == 2 * SHAPE["in_channels"] and clip_model.in_channels == 3
    frames = torch.randn(2, 3, 3, 16, 16)  # T = 3: tubelets (0, 1) and (2, 2)
    dates = torch.tensor([[18000.0, 18010.0, 18030.0], [18000.0, math.nan, math.nan]])
    images, clip = clip_model.read_inputs(Inputs(frames, dates=dates))
    assert images.shape == (4, 6, 16, 16) and clip.frames == 2
    torch.testing.assert_close(images[0], torch.cat([frames[0, 0], frames[0, 1]]))
    torch.testing.assert_close(images[1], torch.cat([frames[0, 2], frames[0, 2]]))  # the last frame, repeated
    torch.testing.assert_close(clip.dates, torch.tensor([[18005.0, 18030.0], [18000.0, math.nan]]), equal_nan=True)
    with torch.no_grad():
        assert torch.isfinite(clip_model(Inputs(frames, dates=dates))).all()
        # an image fills a tubelet with itself: the same as a clip of that image twice
        still = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(clip_model(still), clip_model(still[:, None].expand(-1, 2, -1, -1, -1)))
    with pytest.raises(ValueError, match=r"model.temporal.tubelet_size=0 must be a whole number >= 1"):
        VisionTransformer(**SHAPE, temporal=partial(TEMPORAL[temporal], tubelet_size=0))
