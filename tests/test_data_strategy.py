"""The input data strategy of the DataModule: crop_size (random crops to train, centre or tiled crops to
evaluate), patch overlap, normalization (fixed or auto, stored with the run), balance_ratio (weighted
sampling, resumable) and label_granularity."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, read_summary, run_cli
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from vitsweep.data import DataModule, Split, Splits
from vitsweep.data.datamodule import channel_stats, trained_normalization
from vitsweep.data.digits import load_digits
from vitsweep.data.splits import carve_validation
from vitsweep.task import Classification, Segmentation
from vitsweep.trainer.checkpoint import capture_rng_state, restore_rng_state
from vitsweep.trainer.loop import Trainer, seed_everything

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [o for o in TINY_RUN if not o.startswith("data=")]  # the tiny run, on another data config


def splits(n=64, size=16, channels=3, num_classes=4, dtype=torch.uint8, labels=None, seed=0):
    """Images whose pixels are unique per (sample, position), so crops can be located exactly."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)
    else:
        images = torch.rand(n, channels, size, size, generator=generator).to(dtype)
    labels = torch.arange(n) % num_classes if labels is None else labels
    split = Split(images, labels)
    return Splits(split, split.subset(torch.arange(n // 4)), split.subset(torch.arange(n // 4)),
                  [f"c{i}" for i in range(num_classes)])


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ---- crop_size --------------------------------------------------------------------------------------------


def test_crop_size_keeps_stored_images_and_crops_each_sample_at_random():
    data = DataModule(splits(), image_size=16, in_channels=3, num_classes=4, batch_size=32, crop_size=12)
    assert data.split("train").images.shape[-2:] == (16, 16)  # stored at the decode size
    torch.manual_seed(0)
    images, labels = next(data.train_batches(epoch=0, seed=0))
    assert images.shape == (32, 3, 12, 12) and images.dtype == torch.float32
    order = data.epoch_order(0, 0)[:32]
    stored = data.to_float(data.split("train").images[order])
    offsets = []
    for i in range(32):  # each crop is a 12x12 window of its own stored image
        found = [(t, l) for t in range(5) for l in range(5) if torch.equal(images[i], stored[i, :, t:t + 12, l:l + 12])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # per-sample positions
    assert torch.equal(labels, data.split("train").labels[order])


def test_eval_uses_the_centre_crop_or_tiles_covering_the_image():
    source = splits()
    centre = DataModule(source, image_size=16, in_channels=3, num_classes=4, crop_size=12, eval_batch_size=8)
    images, labels = next(centre.eval_batches("test"))
    stored = centre.to_float(source.test.images[:8])
    assert torch.equal(images, stored[:, :, 2:14, 2:14]) and len(labels) == 8

    tiled = DataModule(source, image_size=16, in_channels=3, num_classes=4, crop_size=12, eval_crop="tiled",
                       eval_batch_size=8)
    assert tiled.eval_views == 4
    images, labels = next(tiled.eval_batches("test", all_views=True))
    assert images.shape == (8, 3, 12, 12) and len(labels) == 2  # 4 views per image, eval_batch_size images
    views = images.view(2, 4, 3, 12, 12)
    expected = [stored[0, :, t:t + 12, l:l + 12] for t in (0, 4) for l in (0, 4)]  # corners: they cover 16x16
    for v in range(4):
        assert torch.equal(views[0, v], expected[v])
    # callers that need one input per label (figures) still get the centre crop
    one, _ = next(tiled.eval_batches("test"))
    assert torch.equal(one, stored[:, :, 2:14, 2:14])


class MeanPixelModel(nn.Module):
    """Logits k = (k + 1) * the mean pixel of the view: the average over views is known in closed form."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * torch.arange(1, 5, dtype=x.dtype)


def test_tiled_evaluation_averages_the_logits_of_each_image_views():
    source = splits()
    data = DataModule(source, image_size=16, in_channels=3, num_classes=4, crop_size=12, eval_crop="tiled",
                      eval_batch_size=12)
    trainer = Trainer(device="cpu", progress_bar=False)
    loss_fn = nn.CrossEntropyLoss()
    task = Classification(loss=loss_fn, num_classes=4)
    task.setup(data, model=None)
    metrics = trainer.validate(MeanPixelModel(), data, "test", task)
    stored = data.normalize(data.to_float(source.test.images))
    view_means = torch.stack([stored[:, :, t:t + 12, l:l + 12].mean(dim=(1, 2, 3)) for t in (0, 4) for l in (0, 4)])
    logits = view_means.mean(0)[:, None] * torch.arange(1, 5)
    assert metrics["test/loss"] == pytest.approx(loss_fn(logits, source.test.labels).item(), rel=1e-5)
    centre_only = stored[:, :, 2:14, 2:14].mean(dim=(1, 2, 3))[:, None] * torch.arange(1, 5)
    assert metrics["test/loss"] != pytest.approx(loss_fn(centre_only, source.test.labels).item(), rel=1e-5)


def test_model_sees_crop_size_and_data_keeps_image_size():
    cfg = composed("data=digits", "data.crop_size=12")
    assert cfg.data.image_size == 16 and cfg.model.image_size == 12
    assert composed("data=digits").model.image_size == 16  # no crop by default
    assert composed("data=synthetic").model.image_size == 16  # data configs without crop_size still work
    with pytest.raises(ValueError, match=r"data.crop_size=20 must be in \[1, data.image_size=16\]"):
        DataModule(splits(), image_size=16, in_channels=3, num_classes=4, crop_size=20)
    with pytest.raises(ValueError, match="data.eval_crop=grid is not one of: center, tiled"):
        DataModule(splits(), image_size=16, in_channels=3, num_classes=4, crop_size=12, eval_crop="grid")


def test_train_batches_resume_mid_epoch_exactly_with_crops_and_balance():
    """The loop reseeds per epoch and restores the RNG state mid-epoch: the rest of the epoch is the same."""
    data = DataModule(splits(n=96), image_size=16, in_channels=3, num_classes=4, batch_size=16, crop_size=12,
                      balance_ratio=0.5, balance_class=0)
    seed_everything(7)
    full = list(data.train_batches(epoch=3, seed=7))
    seed_everything(7)
    batches = data.train_batches(epoch=3, seed=7)
    for _ in range(2):
        next(batches)
    state = capture_rng_state()  # what last.pt holds after 2 batches
    seed_everything(123)  # a fresh process
    restore_rng_state(state)
    resumed = list(data.train_batches(epoch=3, seed=7, skip=2))
    assert len(resumed) == len(full) - 2
    for (a, la), (b, lb) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    seed_everything(7)
    other_epoch = next(data.train_batches(epoch=4, seed=7))
    assert not torch.equal(other_epoch[1], full[0][1])


# ---- patch overlap ----------------------------------------------------------------------------------------


def test_patch_overlap_gives_more_tokens():
    plain = instantiate(composed("data=digits", *TINY).model)
    overlapping = instantiate(composed("data=digits", "model.patch_stride=2", *TINY).model)
    images = torch.rand(2, 1, 16, 16)
    assert plain.patch_embed(images).shape[1] == 16  # 4x4 patches of 4 px
    assert overlapping.patch_embed(images).shape[1] == 49  # every 2 px: 7x7
    assert overlapping(images).shape == (2, 10)


# ---- normalization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,channels", [(torch.uint8, 3), (torch.float32, 5)])
def test_auto_normalization_makes_the_training_split_zero_mean_unit_variance(dtype, channels):
    source = splits(n=128, channels=channels, dtype=dtype)
    scale = torch.linspace(0.2, 1.0, channels).view(1, -1, 1, 1)  # channels on different scales
    if dtype == torch.float32:
        source.train.images = source.train.images * scale + 3 * scale
    data = DataModule(source, image_size=16, in_channels=channels, num_classes=4, normalization="auto")
    normalized = data.normalize(data.to_float(source.train.images))
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.std(dim=(0, 2, 3)), torch.ones(channels), atol=1e-3, rtol=0)
    assert len(data.normalization_stats()["mean"]) == channels


def test_auto_normalization_uses_the_training_split_only():
    source = splits()
    before = DataModule(source, image_size=16, in_channels=3, num_classes=4, normalization="auto").normalization_stats()
    source.val = Split(torch.full_like(source.val.images, 255), source.val.labels)
    source.test = Split(torch.zeros_like(source.test.images), source.test.labels)
    after = DataModule(source, image_size=16, in_channels=3, num_classes=4, normalization="auto").normalization_stats()
    assert before == after


def test_eval_mode_takes_the_statistics_stored_in_the_checkpoint():
    checkpoint = {"config": {"data": {"normalization": "auto", "mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}}}
    args = trained_normalization(checkpoint)
    data = DataModule(splits(), image_size=16, in_channels=3, num_classes=4, **args)
    assert data.normalization_stats() == {"mean": pytest.approx([0.1, 0.2, 0.3]), "std": pytest.approx([1, 2, 3])}
    fixed = {"config": {"data": {"normalization": "fixed", "mean": [0.5] * 3, "std": [0.5] * 3}}}
    assert trained_normalization(fixed) == {} and trained_normalization({}) == {}


@pytest.mark.slow
def test_auto_statistics_are_stored_with_the_run_and_reused_in_eval_mode(cli, tmp_path):
    cli(["data=digits", "data.normalization=auto", "data.batch_size=256", "logger=none", *TINY])
    run_dir = tmp_path / "run"
    summary = read_summary(run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    expected_mean, expected_std = channel_stats(load_digits(16, split_seed=0).train.images)
    assert checkpoint["config"]["data"]["mean"] == pytest.approx(expected_mean)
    assert summary["normalization"] == {"mean": pytest.approx(expected_mean), "std": pytest.approx(expected_std)}

    # eval mode on a differently drawn training split: recomputing would give other statistics
    other_mean, _ = channel_stats(load_digits(16, split_seed=1).train.images)
    assert other_mean != pytest.approx(expected_mean, abs=1e-6)
    (tmp_path / "eval").mkdir()
    run_cli(["mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'best.pt'}", "data=digits", "data.normalization=auto",
             "data.source.split_seed=1", "logger=none", *TINY], tmp_path / "eval")
    assert read_summary(tmp_path / "eval" / "run")["normalization"] == summary["normalization"]


# ---- balance_ratio ----------------------------------------------------------------------------------------


def rare_class_splits(n=5000, share=0.05):
    labels = (torch.arange(n) < int(share * n)).long()  # class 1 ("riot") is 5% of the data
    return splits(n=n, size=4, channels=1, num_classes=2, labels=labels)


def test_balance_ratio_sets_the_class_share_of_each_epoch():
    source = rare_class_splits()
    natural = DataModule(source, image_size=4, in_channels=1, num_classes=2, batch_size=100)
    balanced = DataModule(source, image_size=4, in_channels=1, num_classes=2, batch_size=100,
                          balance_ratio=0.3, balance_class=1)
    for epoch in range(3):
        labels = torch.cat([y for _, y in balanced.train_batches(epoch, seed=0)])
        assert len(labels) == 5000  # the epoch length does not change
        assert (labels == 1).float().mean().item() == pytest.approx(0.3, abs=0.03)
        natural_labels = torch.cat([y for _, y in natural.train_batches(epoch, seed=0)])
        assert (natural_labels == 1).float().mean().item() == pytest.approx(0.05, abs=1e-9)
    # a function of (seed, epoch): the same draw again, another draw for another epoch or seed
    assert torch.equal(balanced.epoch_order(2, 0), balanced.epoch_order(2, 0))
    assert not torch.equal(balanced.epoch_order(2, 0), balanced.epoch_order(3, 0))
    assert not torch.equal(balanced.epoch_order(2, 0), balanced.epoch_order(2, 1))


def test_balance_class_by_name_and_for_multi_hot_labels():
    source = rare_class_splits()
    by_name = DataModule(source, image_size=4, in_channels=1, num_classes=2, balance_ratio=0.5, balance_class="c1")
    order = by_name.epoch_order(0, 0)
    assert (source.train.labels[order] == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)

    multi_hot = torch.zeros(4000, 3)
    multi_hot[:200, 2] = 1  # label 2 on 5% of the images
    multi_hot[:, 0] = 1
    multi = splits(n=4000, size=4, channels=1, num_classes=3, labels=multi_hot)
    data = DataModule(multi, image_size=4, in_channels=1, num_classes=3, balance_ratio=0.4, balance_class=2)
    assert multi.train.labels[data.epoch_order(0, 0), 2].mean().item() == pytest.approx(0.4, abs=0.03)


@pytest.mark.parametrize("ratio,cls,message", [
    (1.5, 1, "data.balance_ratio=1.5 is the share"),
    (0.3, None, "data.balance_ratio=0.3 needs data.balance_class"),
    (0.3, "riot", "data.balance_class=riot is not a class index"),
    (0.3, 3, "data.balance_class=3 is not a class index"),
])
def test_balance_errors_name_the_key(ratio, cls, message):
    with pytest.raises(ValueError, match=message):
        DataModule(rare_class_splits(n=100), image_size=4, in_channels=1, num_classes=2,
                   balance_ratio=ratio, balance_class=cls)


def test_balance_class_without_members_fails():
    source = splits(n=40, size=4, channels=1, num_classes=3, labels=torch.arange(40) % 2)  # class 2 absent
    with pytest.raises(ValueError, match="data.balance_class=2: 0 of the 40 training samples"):
        DataModule(source, image_size=4, in_channels=1, num_classes=3, balance_ratio=0.3, balance_class=2)


# ---- label_granularity, metadata --------------------------------------------------------------------------


def test_label_granularity_values_and_the_tasks_they_fit():
    for value in ("auto", "image", "patch", "pixel"):
        assert DataModule(splits(), image_size=16, in_channels=3, num_classes=4, label_granularity=value)
    with pytest.raises(ValueError, match="data.label_granularity=voxel is not one of: auto, image, patch, pixel"):
        DataModule(splits(), image_size=16, in_channels=3, num_classes=4, label_granularity="voxel")
    for value in ("patch", "pixel"):  # a class per image cannot be learnt at patch or pixel level
        with pytest.raises(ValueError, match=f"data.label_granularity={value}: task=classification learns one"):
            Classification(num_classes=4, granularity=value)
    with pytest.raises(ValueError, match="data.label_granularity=image does not fit task=segmentation"):
        Segmentation(num_classes=4, granularity="image")


def test_metadata_travels_with_its_samples():
    source = splits(n=40)
    metadata = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 2)
    train = Split(source.train.images, source.train.labels, metadata)
    rest, held_out = carve_validation(train, 0.25, seed=0)
    for part in (rest, held_out):  # row i of the metadata still belongs to image i
        index = part.metadata[:, 0].long()
        assert torch.equal(part.images, source.train.images[index]) and torch.equal(part.labels, train.labels[index])
    data = DataModule(Splits(rest, held_out, held_out, source.class_names), 16, 3, 4).to("cpu")
    assert torch.equal(data.split("train").metadata, rest.metadata)
