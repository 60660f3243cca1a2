"""Task objectives: what each task's heads, losses and metrics compute, that masks stay aligned with
their images, that missing labels count nowhere, and that uncertainty weighting finds log L_i."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitsweep.augment.geometric import Flips, RandomCrop, Rotation
from vitsweep.augment.mix import CutMix, Mixup
from vitsweep.augment.photometric import ColorJitter
from vitsweep.augment.randaugment import GEOMETRIC, OPS, RandAugment
from vitsweep.data.crops import random_crops
from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.data.synthetic import load_synthetic
from vitsweep.data.targets import ClassLabels, Masks, Values
from vitsweep.loss import CrossEntropy
from vitsweep.model import create_vit
from vitsweep.task import Classification, MultiTask, Regression, Segmentation
from vitsweep.task.masks import patch_labels
from vitsweep.task.objective import attention_loss


def tiny(**kwargs):
    torch.manual_seed(0)
    args = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 3, "embed_dim": 16, "depth": 2,
            "num_heads": 2, "mlp_dim": 32}
    return create_vit(**{**args, **kwargs})


class FakeData:
    """What a task reads of the data (vitsweep.data.dataset_info.DatasetInfo), from labels held here and
    summarized by the task's own readers, as DataModule.target_summary does."""

    def __init__(self, labels, class_names=(), images=None):
        self.labels, self.names = labels, class_names
        self.image_size = 16 if images is None else tuple(images.shape[-2:])
        self.eval_views, self.frames, self.balanced, self.readers = 1, None, False, {}

    def read_by(self, task):
        self.readers = task.targets()
        return self

    def class_names(self, target=None):
        return list(self.names.get(target, [])) if isinstance(self.names, dict) else list(self.names)

    def target_summary(self, target=None, split="train"):
        labels = self.labels[target] if isinstance(self.labels, dict) else self.labels
        return self.readers[target].summarize(labels)


def setup_on(task, data, model):
    """task.setup on fake data summarized by the task's readers; the task, for chaining."""
    task.setup(data.read_by(task), model)
    return task


# ------------------------------------------------------------------------------------------ heads


def test_each_task_puts_its_head_on_the_trunk():
    images = torch.rand(2, 3, 16, 16)
    assert tiny(**Regression(targets=["a", "b"]).model_args())(images).shape == (2, 2)
    pixel = Segmentation(num_classes=4)
    assert tiny(**pixel.model_args())(images).shape == (2, 4, 16, 16)
    pup = Segmentation(num_classes=4, decoder="pup")
    assert tiny(**pup.model_args())(images).shape == (2, 4, 16, 16)
    patch = Segmentation(num_classes=4, granularity="patch")
    assert tiny(**patch.model_args())(images).shape == (2, 4, 4, 4)
    multi = MultiTask({"riot": {"type": "classification", "column": "riot", "num_classes": 2},
                       "crowd": {"type": "regression", "column": "n"},
                       "area": {"type": "segmentation", "column": "m", "num_classes": 3}})
    out = tiny(**multi.model_args())(images)
    assert out["riot"].shape == (2, 2) and out["crowd"].shape == (2, 1) and out["area"].shape == (2, 3, 16, 16)


def test_auxiliary_heads_train_alongside_and_leave_eval_outputs_alone():
    task = Classification(loss=CrossEntropy(), num_classes=3, aux_heads=["deep_supervision", "region", "attention"],
                          aux={"deep_supervision": {"block": 0, "weight": 0.5}})
    model = tiny(**task.model_args())
    images = torch.rand(4, 3, 16, 16)
    masks = torch.zeros(4, 16, 16, dtype=torch.uint8)
    masks[:, :8, :8] = 1  # the region: the top-left quarter
    targets = {"label": torch.tensor([0, 1, 2, 0]), "region": masks}
    task.setup(FakeData(targets, ["a", "b", "c"], images).read_by(task), model)
    out = model.train()(images)
    assert set(out) == {"out", "deep_supervision", "region", "attention"}
    assert out["deep_supervision"].shape == (4, 3) and out["region"].shape == (4, 2, 4, 4)
    assert out["attention"].shape == (4, 4, 4)
    main = task.loss(out["out"], targets["label"])
    expected = (main + 0.5 * task.loss(out["deep_supervision"], targets["label"])
                + 0.3 * F.cross_entropy(out["region"], task.region(masks))
                + 0.1 * attention_loss(out["attention"], task.region(masks)))
    torch.testing.assert_close(task.loss(out, targets), expected)
    assert model.eval()(images).shape == (4, 3)  # at eval the model gives its main output only


def test_attention_loss_is_zero_when_attention_matches_the_region():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[:, :2, :2] = 1
    matching = labels.float() / labels.float().sum(dim=(1, 2), keepdim=True)
    assert attention_loss(matching, labels).item() == pytest.approx(0, abs=1e-6)
    assert attention_loss(torch.full((2, 4, 4), 1 / 16), labels).item() > 0.5


# --------------------------------------------------------------------------------- missing labels


def test_missing_labels_count_in_no_loss_and_no_metric():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, -1, 2, -1, 1])
    logits = torch.randn(6, 3)
    known = labels >= 0
    task = Classification(loss=CrossEntropy(), num_classes=3)
    task.setup(FakeData(labels, ["a", "b", "c"]).read_by(task), None)
    torch.testing.assert_close(task.loss(logits, labels), F.cross_entropy(logits[known], labels[known]))
    evaluator, reference = task.evaluator(), task.evaluator()
    evaluator.update(logits, labels)
    reference.update(logits[known], labels[known])
    assert evaluator.compute("val") == reference.compute("val")

    values = torch.tensor([[1.0, 5.0], [2.0, float("nan")], [float("nan"), 7.0], [4.0, 8.0], [3.0, 6.0]])
    regression = Regression(targets=["a", "b"])
    regression.setup(FakeData(values).read_by(regression), None)
    assert regression.mean.tolist() == pytest.approx([2.5, 6.5])  # the NaNs are not in the statistics
    outputs = torch.randn(5, 2, requires_grad=True)
    loss = regression.loss(outputs, values)
    loss.backward()
    assert torch.isfinite(loss) and outputs.grad[1, 1] == 0 and outputs.grad[2, 0] == 0 and outputs.grad[0, 0] != 0
    scores = regression.evaluator()
    scores.update(outputs.detach(), values)
    metrics = scores.compute("val")
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())

    masks = torch.randint(0, 2, (3, 16, 16), dtype=torch.uint8)
    masks[0] = IGNORE_INDEX  # an image without a label: no loss, no metric
    segmentation = Segmentation(num_classes=2)
    model = tiny(**segmentation.model_args())
    segmentation.setup(FakeData(masks).read_by(segmentation), model)
    seg_logits = torch.randn(3, 2, 16, 16)
    torch.testing.assert_close(segmentation.loss(seg_logits, masks), segmentation.loss(seg_logits[1:], masks[1:]))
    with_blank, without = segmentation.evaluator(), segmentation.evaluator()
    with_blank.update(seg_logits, masks)
    without.update(seg_logits[1:], masks[1:])
    assert with_blank.compute("val") == pytest.approx(without.compute("val"))


def test_a_head_without_any_label_in_a_batch_gives_zero_loss_not_nan():
    multi = MultiTask({"riot": {"type": "classification", "column": "riot", "num_classes": 2},
                       "crowd": {"type": "regression", "column": "n"}})
    labels = {"riot": torch.tensor([0, 1, -1, 0]), "crowd": torch.tensor([[1.0], [2.0], [float("nan")], [4.0]])}
    model = tiny(**multi.model_args())
    multi.setup(FakeData(labels, {"riot": ["no", "yes"]}).read_by(multi), model)
    outputs = model(torch.rand(4, 3, 16, 16))
    blank = {"riot": torch.full((4,), -1), "crowd": torch.full((4, 1), float("nan"))}
    assert multi.loss(outputs, blank).item() == 0.0


# ---------------------------------------------------------------------------- loss weighting


def test_uncertainty_weighting_learns_log_variances_equal_to_log_of_each_loss():
    multi = MultiTask({"riot": {"type": "classification", "column": "riot", "num_classes": 2},
                       "crowd": {"type": "regression", "column": "n"}}, weighting="uncertainty")
    model = tiny(**multi.model_args())
    multi.setup(FakeData({"riot": torch.tensor([0, 1]), "crowd": torch.tensor([[1.0], [2.0]])},
                              {"riot": ["no", "yes"]}).read_by(multi), model)
    fixed = {"riot": 0.3, "crowd": 2.5}  # per-task losses held fixed
    for name, objective in multi.objectives.items():
        objective.head_loss = lambda outputs, targets, value=fixed[name]: torch.tensor(value)
    optimizer = torch.optim.Adam([model.head.log_vars], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        multi.loss({"riot": None, "crowd": None}, {"riot": None, "crowd": None}).backward()
        optimizer.step()
    torch.testing.assert_close(model.head.log_vars.detach(), torch.tensor([0.3, 2.5]).log(), atol=2e-3, rtol=0)


def test_loss_weights_have_their_own_optimizer_group_without_weight_decay():
    from vitsweep.optimizer import build_optimizer

    multi = MultiTask({"a": {"type": "regression", "column": "a"}, "b": {"type": "regression", "column": "b"}},
                      weighting="uncertainty")
    model = tiny(**multi.model_args())
    optimizer = build_optimizer(model, name="adamw", weight_decay=0.05)
    [own] = [group for group in optimizer.param_groups if any(p is model.head.log_vars for p in group["params"])]
    assert own["params"] == [model.head.log_vars] and own["weight_decay"] == 0.0
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


# -------------------------------------------------------------------------------------- targets


def test_regression_standardizes_with_training_statistics_and_reports_original_units():
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    task = Regression(targets=["crowd"])
    task.setup(FakeData(values).read_by(task), None)
    assert task.mean.item() == 25.0 and task.std.item() == pytest.approx(values.std().item())
    perfect = (values - 25.0) / task.std  # what a perfect model outputs: standardized values
    evaluator = task.evaluator()
    evaluator.update(perfect, values)
    metrics = evaluator.compute("test")
    assert metrics["test/mae"] == pytest.approx(0, abs=1e-5) and metrics["test/r2"] == pytest.approx(1.0)
    off_by_two = task.evaluator()
    off_by_two.update(perfect + 2 / task.std, values)  # two people too many, in the original unit
    assert off_by_two.compute("test")["test/mae"] == pytest.approx(2.0, rel=1e-4)
    restored = Regression(targets=["crowd"])
    restored.load_state_dict(task.state_dict())
    assert restored.mean.item() == 25.0 and restored.std.item() == task.std.item()


def test_patch_labels_are_each_patches_majority_of_labelled_pixels():
    masks = torch.zeros(1, 4, 8, dtype=torch.uint8)
    masks[0, :, :3] = 1  # the first patch: 12 of 16 pixels are class 1
    masks[0, :, 4:] = IGNORE_INDEX
    masks[0, 0, 4] = 2  # the second patch: one labelled pixel, class 2
    assert patch_labels(masks, 3, (4, 4), (4, 4)).tolist() == [[[1, 2]]]
    masks[0, 0, 4] = IGNORE_INDEX
    assert patch_labels(masks, 3, (4, 4), (4, 4)).tolist() == [[[1, IGNORE_INDEX]]]


def test_segmentation_metrics_from_a_hand_counted_confusion_matrix():
    task = Segmentation(num_classes=3, granularity="pixel")
    task.setup(FakeData(torch.zeros(1, 2, 3, dtype=torch.uint8), images=torch.zeros(1, 3, 2, 3)).read_by(task),
                    tiny(image_size=(4, 4), patch_size=2))
    target = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    evaluator = task.evaluator()
    evaluator.update(F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 10, target)
    metrics = evaluator.compute("val")
    # labelled pixels only. class 0: TP 1, true 2, predicted 1 -> IoU 1/2; class 1: TP 2, true 2, predicted 4
    # -> 2/4; class 2: TP 0, true 1, predicted 0 -> 0
    assert metrics["val/iou/0"] == pytest.approx(0.5) and metrics["val/iou/1"] == pytest.approx(0.5)
    assert metrics["val/miou"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert metrics["val/pixel_acc"] == pytest.approx(3 / 5)  # the ignored pixel is not counted


def test_tasks_refuse_targets_that_do_not_fit_in_one_line():
    with pytest.raises(ValueError, match="task=regression needs numeric targets"):
        setup_on(Regression(), FakeData(torch.tensor([0, 1, 2])), None)
    with pytest.raises(ValueError, match="task=segmentation needs a mask"):
        setup_on(Segmentation(num_classes=2), FakeData(torch.tensor([0, 1])), tiny())
    with pytest.raises(ValueError, match="task=classification needs class labels"):
        setup_on(Classification(loss=CrossEntropy(), num_classes=2), FakeData(torch.zeros(2, 16, 16)), None)
    with pytest.raises(ValueError, match="task.heads.crowd.type=count is not one of"):
        MultiTask({"crowd": {"type": "count", "column": "n"}})
    with pytest.raises(ValueError, match="the training split has 1 class"):
        setup_on(Classification(loss=CrossEntropy(), num_classes=2), FakeData(torch.tensor([1, 1, 1])), None)


# ------------------------------------------------------------------------ masks follow the geometry


def coded_batch(n=8, size=32, block=8):
    """Images whose every pixel carries its mask's label as its value (all channels), in blocks of one
    label, so bilinear and nearest sampling agree away from block borders."""
    blocks = torch.randint(0, 10, (n, size // block, size // block))
    masks = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2).to(torch.uint8)  # (n, size, size)
    images = (masks.float() / 10)[:, None].repeat(1, 3, 1, 1)
    return images, masks


def decoded(images):
    return (images[:, 0] * 10).round().long()


def away_from_borders(masks):
    """(B, H, W) bool: labelled pixels whose 5x5 neighbourhood holds one label, where a bilinear sample
    of the image cannot reach another block."""
    as_float = masks[:, None].float()
    same = F.max_pool2d(as_float, 5, 1, 2)[:, 0] == -F.max_pool2d(-as_float, 5, 1, 2)[:, 0]
    inside = torch.zeros_like(same)
    inside[:, 2:-2, 2:-2] = True  # at the image's edge a bilinear sample blends with the fill
    return same & inside & (masks != IGNORE_INDEX)


GEOMETRIC_OPS = {
    "random_crop": RandomCrop(padding=4),
    "flips": Flips(horizontal=0.5, vertical=0.5),
    "rotation": Rotation(degrees=90, p=1.0),
}


@pytest.mark.parametrize("name", list(GEOMETRIC_OPS))
def test_masks_follow_every_geometric_op(name):
    torch.manual_seed(0)
    images, masks = coded_batch()
    op = GEOMETRIC_OPS[name]
    out_images, out_masks = op(images, masks)
    assert out_masks.shape == masks.shape and out_masks.dtype == torch.uint8
    assert not torch.equal(out_masks, masks)  # the op did move them
    labelled = out_masks != IGNORE_INDEX
    interior = away_from_borders(out_masks)
    agreement = (decoded(out_images) == out_masks.long())[interior].float().mean()
    assert interior.sum() > 0.1 * masks.numel()
    if name in ("random_crop", "flips"):  # whole-pixel moves: exact everywhere
        assert torch.equal(decoded(out_images)[labelled], out_masks.long()[labelled])
        assert (out_images[:, 0][~labelled] == 0).all()  # padding: zero image, ignored mask
    else:
        assert agreement == 1.0


def test_randaugment_geometric_ops_move_masks_with_their_images(monkeypatch):
    torch.manual_seed(1)
    images, masks = coded_batch(16)
    geometric_only = {name: value for name, value in OPS.items() if name in GEOMETRIC or name == "identity"}
    monkeypatch.setattr("vitsweep.augment.randaugment.OPS", geometric_only)
    out_images, out_masks = RandAugment(num_ops=1, magnitude=15)(images, masks)
    interior = away_from_borders(out_masks)
    assert not torch.equal(out_masks, masks)
    assert (decoded(out_images) == out_masks.long())[interior].float().mean() == 1.0


def test_data_crops_cut_masks_at_the_same_windows_and_photometric_ops_leave_them():
    torch.manual_seed(0)
    images, masks = coded_batch()
    cropped, cropped_masks = random_crops((images * 10).round().to(torch.uint8), 8, masks)
    assert torch.equal(cropped[:, 0].long(), cropped_masks.long())
    jittered, same = ColorJitter(brightness=0.5, contrast=0.5, saturation=0.0, hue=0.0)(images, masks)
    assert same is masks and not torch.equal(jittered, images)


def test_cutmix_pastes_masks_with_the_same_box_and_mixup_refuses_them():
    torch.manual_seed(0)
    images, masks = coded_batch()
    mixed, mixed_masks = CutMix(num_classes=10, alpha=1.0)(images, masks)
    assert torch.equal(decoded(mixed), mixed_masks.long())
    assert not torch.equal(mixed_masks, masks)
    with pytest.raises(ValueError, match="augment=mixup blends two images, but a segmentation mask cannot be"):
        Mixup(num_classes=10)(images, masks)
    with pytest.raises(ValueError, match="task=multi_task has one per head"):
        CutMix(num_classes=10)(images, {"a": masks, "b": torch.zeros(8)})


# ------------------------------------------------------------------------------------- data


def test_synthetic_data_plants_a_signal_per_target_and_blanks_the_missing_share():
    splits = load_synthetic(image_size=16, num_classes=3, num_train=400, missing=0.25,
                            targets={"riot": ClassLabels("riot"), "crowd": Values("crowd"), "area": Masks("area")})
    labels = splits.train.labels
    assert labels["riot"].dtype == torch.int64 and labels["crowd"].shape == (400, 1)
    assert labels["area"].shape == (400, 16, 16) and labels["area"].dtype == torch.uint8
    for missing in ((labels["riot"] == -1), labels["crowd"][:, 0].isnan(),
                    (labels["area"] == IGNORE_INDEX).flatten(1).all(dim=1)):
        assert 0.15 < missing.float().mean() < 0.35
    assert set(splits.class_names) == {"riot", "area"}  # regression targets have no classes
    single = load_synthetic(targets={"value": Values("value")})
    assert single.train.labels.shape == (256, 1) and single.class_names == []


def test_loaders_of_class_labels_refuse_other_targets_in_one_line():
    from vitsweep.data.digits import load_digits

    with pytest.raises(ValueError, match="data=digits gives one class label per image, but the task asks for "
                                         "numbers \\(target\\)"):
        load_digits(targets=Regression(targets=["target"]).targets())
    assert load_digits(targets=Classification(num_classes=10).targets()).train.labels.dim() == 1


def test_partial_aux_head_factories_are_plain_modules():
    factory = Segmentation(num_classes=2, aux_heads=["attention"]).model_args()["aux_heads"]["attention"]
    assert isinstance(factory, partial)
    assert tiny(aux_heads={"attention": factory}).aux_heads["attention"].reads_attention == (-1,)
