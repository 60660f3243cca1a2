"""Metric values on known logits: perfect predictions score 1, a hand-computed case scores what the
definitions give, multi-label metrics use sigmoids, unknown names fail listing the valid ones, and
the confusion matrix PNG is written and readable."""

import matplotlib.image
import pytest
import torch

from vitsweep.metrics import ClassificationMetrics
from vitsweep.viz import confusion_matrix_figure, save_figure

ALL = ["accuracy", "top5", "auroc", "precision", "recall", "f1"]


def one_hot_logits(predicted: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float() * 5


def test_perfect_predictions_score_one():
    labels = torch.arange(12) % 6
    metrics = ClassificationMetrics(ALL)(one_hot_logits(labels.tolist(), 6), labels, "val", [f"c{i}" for i in range(6)])
    assert set(metrics) == {"val/acc", "val/acc_top5"} | {
        f"val/{name}{suffix}" for name in ("auroc", "precision", "recall", "f1") for suffix in ["", *[f"/c{i}" for i in range(6)]]}
    assert all(value == pytest.approx(1.0) for value in metrics.values())


def test_hand_computed_single_label_case():
    # labels 0 0 1 1, predictions 0 1 1 1
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    m = ClassificationMetrics(ALL)(logits, labels, "test")
    assert m["test/acc"] == pytest.approx(0.75)
    assert m["test/precision/0"] == pytest.approx(1.0) and m["test/precision/1"] == pytest.approx(2 / 3)
    assert m["test/recall/0"] == pytest.approx(0.5) and m["test/recall/1"] == pytest.approx(1.0)
    assert m["test/precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["test/f1/0"] == pytest.approx(2 / 3) and m["test/f1/1"] == pytest.approx(0.8)
    assert m["test/f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # class-1 probabilities rank the positives (samples 2, 3) above both negatives: AUROC 1
    assert m["test/auroc"] == pytest.approx(1.0)
    assert "test/acc_top5" not in m  # 2 classes: top-5 is meaningless


def test_auroc_counts_misordered_pairs():
    # class-1 scores: negatives 0.1, 0.6; positives 0.4, 0.9 -> 3 of 4 pairs ordered: AUROC 0.75
    p1 = torch.tensor([0.1, 0.6, 0.4, 0.9])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))], dim=1)  # softmax class 1 = p1
    m = ClassificationMetrics(["auroc"])(logits, torch.tensor([0, 0, 1, 1]), "val")
    assert m["val/auroc/1"] == pytest.approx(0.75) and m["val/auroc"] == pytest.approx(0.75)


def test_top5_counts_the_true_class_within_the_five_largest():
    logits = torch.arange(8.0).repeat(3, 1)  # class 7 largest, then 6, 5, ...
    m = ClassificationMetrics(["accuracy", "top5"])(logits, torch.tensor([7, 4, 1]), "val")
    assert m["val/acc"] == pytest.approx(1 / 3) and m["val/acc_top5"] == pytest.approx(2 / 3)


def test_multi_label_metrics():
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    metrics = ClassificationMetrics(ALL, multi_label=True)
    perfect = metrics(labels * 10 - 5, labels, "val")
    assert "val/acc_top5" not in perfect
    assert all(value == pytest.approx(1.0) for value in perfect.values())
    # one wrong label in the first image: exact match 3/4; label 1 gets a false positive
    predicted = labels.clone()
    predicted[0, 1] = 1
    m = metrics(predicted * 10 - 5, labels, "val")
    assert m["val/acc"] == pytest.approx(0.75)
    assert m["val/precision/1"] == pytest.approx(2 / 3) and m["val/recall/1"] == pytest.approx(1.0)
    assert m["val/precision/0"] == pytest.approx(1.0) and m["val/precision"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_multi_label_thresholds_the_sigmoid_even_when_logits_lie_in_0_1():
    # logits of 0.3 are sigmoid 0.57: predicted positive (read as probabilities they would not be)
    labels = torch.ones(4, 2)
    m = ClassificationMetrics(["accuracy", "recall"], multi_label=True)(torch.full((4, 2), 0.3), labels, "val")
    assert m["val/recall"] == pytest.approx(1.0) and m["val/acc"] == pytest.approx(1.0)


def test_batch_accuracy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, -3.0]])
    single = ClassificationMetrics()
    assert single.batch_accuracy(logits, torch.tensor([0, 2])).item() == pytest.approx(0.5)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0]])  # mixup targets count their largest class
    assert single.batch_accuracy(logits, soft).item() == pytest.approx(1.0)
    multi = ClassificationMetrics(multi_label=True)  # exact match over labels, logit > 0 is positive
    assert multi.batch_accuracy(logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])).item() == pytest.approx(0.5)


def test_per_class_can_be_turned_off_and_names_select_metrics():
    labels = torch.arange(6) % 3
    m = ClassificationMetrics(["f1"], per_class=False)(one_hot_logits(labels.tolist(), 3), labels, "val")
    assert list(m) == ["val/f1"]


def test_unknown_metric_names_fail_listing_the_valid_ones():
    with pytest.raises(ValueError, match="metrics.names has unknown auc, mAP: valid names are accuracy, top5, "
                                         "auroc, precision, recall, f1"):
        ClassificationMetrics(["accuracy", "auc", "mAP"])


def test_confusion_matrix_png_is_written_and_readable(tmp_path):
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = one_hot_logits([0, 1, 1, 2, 2, 0], 3)
    path = save_figure(confusion_matrix_figure(logits, labels, ["cat", "dog", "bird"]),
                       tmp_path / "figs" / "confusion_matrix.png")
    assert path == tmp_path / "figs" / "confusion_matrix.png" and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 300
    assert pixels[..., :3].std() > 0.05  # a drawn matrix, not a blank canvas
    with pytest.raises(ValueError, match="multi-hot labels"):
        confusion_matrix_figure(logits, one_hot_logits([0, 1, 1, 2, 2, 0], 3), None)
