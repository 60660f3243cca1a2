"""The loss options compute what they say: focal reduces to cross entropy at gamma 0 and down-weights
easy examples otherwise, class weights (explicit or balanced) re-weight classes, BCE and the
multi-label set-up use one sigmoid per class, and a mismatched set-up fails before training."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitsweep.data import DataModule
from vitsweep.data.synthetic import load_synthetic
from vitsweep.data.targets import ClassLabels
from vitsweep.logger.run_logger import RunLogger
from vitsweep.loss import BinaryCrossEntropy, CrossEntropy, FocalLoss, resolve_class_weights
from vitsweep.metrics import ClassificationMetrics
from vitsweep.model import VisionTransformer
from vitsweep.optimizer import build_optimizer
from vitsweep.scheduler import constant
from vitsweep.task import Classification
from vitsweep.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
K = 4



def summary(labels: torch.Tensor) -> dict:
    """What the task hands a loss: the training labels summarized by their reader (no labels held)."""
    return ClassLabels("label").summarize(labels)

def batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, generator=generator) * 2
    labels = torch.randint(0, K, (n,), generator=generator)
    return logits, labels


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, labels = batch()
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, labels), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(16, K), dim=-1)  # mixup-style soft targets
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, soft), F.cross_entropy(logits, soft))
    weights = [1.0, 2.0, 0.5, 3.0]
    torch.testing.assert_close(FocalLoss(gamma=0.0, class_weights=weights, num_classes=K)(logits, labels),
                               F.cross_entropy(logits, labels, weight=torch.tensor(weights)))
    torch.testing.assert_close(FocalLoss(gamma=0.0, class_weights=weights, num_classes=K)(logits, soft),
                               F.cross_entropy(logits, soft, weight=torch.tensor(weights)))


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[6.0, 0.0, 0.0, 0.0]])  # p_t close to 1
    hard = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # p_t = 1/4
    label = torch.tensor([0])
    focal, ce = FocalLoss(gamma=2.0), CrossEntropy()
    # exactly (1 - p_t)^gamma times cross entropy
    p_easy = easy.softmax(-1)[0, 0]
    torch.testing.assert_close(focal(easy, label), (1 - p_easy) ** 2 * ce(easy, label))
    assert focal(easy, label) / ce(easy, label) < 0.001
    assert focal(hard, label) / ce(hard, label) > 0.5


def test_multi_label_focal_is_torchvision_sigmoid_focal_and_bce_at_gamma_zero():
    logits = torch.randn(8, K)
    targets = (torch.rand(8, K) < 0.5).float()
    torch.testing.assert_close(FocalLoss(gamma=0.0, multi_label=True)(logits, targets),
                               F.binary_cross_entropy_with_logits(logits, targets))
    # alpha weighs positives by alpha and negatives by 1 - alpha
    per_label = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    alpha_weight = 0.25 * targets + 0.75 * (1 - targets)
    torch.testing.assert_close(FocalLoss(gamma=0.0, alpha=0.25, multi_label=True)(logits, targets),
                               (alpha_weight * per_label).mean())


def test_bce_uses_one_sigmoid_per_class():
    logits, labels = batch()
    one_hot = F.one_hot(labels, K).float()
    torch.testing.assert_close(BinaryCrossEntropy()(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, one_hot))
    multi_hot = (torch.rand(16, K) < 0.5).float()
    torch.testing.assert_close(BinaryCrossEntropy(multi_label=True)(logits, multi_hot),
                               F.binary_cross_entropy_with_logits(logits, multi_hot))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(BinaryCrossEntropy(class_weights=weights.tolist(), num_classes=K)(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, one_hot, weight=weights))


def test_label_smoothing_moves_the_target_off_one_hot():
    confident = torch.tensor([[10.0, -10.0, -10.0, -10.0]])
    label = torch.tensor([0])
    assert CrossEntropy(label_smoothing=0.1)(confident, label) > 10 * CrossEntropy()(confident, label)
    smoothed = torch.full((1, K), 0.1 / K)
    smoothed[0, 0] += 0.9
    torch.testing.assert_close(CrossEntropy(label_smoothing=0.1)(confident, label), F.cross_entropy(confident, smoothed))


def test_balanced_weights_up_weight_the_rare_class():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = resolve_class_weights("balanced", 2, summary(labels))
    torch.testing.assert_close(weights, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    # a mistake on the rare class now costs more than the same mistake on the common one
    loss = CrossEntropy(class_weights="balanced", num_classes=2, train_summary=summary(labels))
    wrong = torch.tensor([[0.0, 0.0]])
    per_class = [F.cross_entropy(wrong, torch.tensor([c]), weight=weights, reduction="sum") for c in (0, 1)]
    assert per_class[1] > 8 * per_class[0]
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    both = torch.tensor([0, 1])
    torch.testing.assert_close(loss(logits, both), F.cross_entropy(logits, both, weight=weights))
    # multi-hot labels: positives per class
    multi_hot = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(resolve_class_weights("balanced", 2, summary(multi_hot)), torch.tensor([4 / 8, 4 / 2]))


def test_class_weights_fail_clearly():
    with pytest.raises(ValueError, match="loss.class_weights has 2 values but data.num_classes=4"):
        CrossEntropy(class_weights=[1.0, 2.0], num_classes=4)
    with pytest.raises(ValueError, match="loss.class_weights='inverse' is not one of"):
        CrossEntropy(class_weights="inverse", num_classes=4)
    with pytest.raises(ValueError, match="classes \\[2\\] have no training images"):
        FocalLoss(class_weights="balanced", num_classes=3, train_summary=summary(torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        BinaryCrossEntropy(class_weights=[1.0, -1.0], num_classes=2)
    with pytest.raises(ValueError, match="needs the training labels"):
        CrossEntropy(class_weights="balanced", num_classes=2)


def test_label_set_up_mismatches_fail_clearly():
    indices, multi_hot = torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="loss=cross_entropy is a softmax over exclusive classes"):
        CrossEntropy(multi_label=True, train_summary=summary(multi_hot))
    with pytest.raises(ValueError, match="multi_label=true but the training labels are one class index"):
        BinaryCrossEntropy(multi_label=True, train_summary=summary(indices))
    with pytest.raises(ValueError, match="multi_label=false but the training labels are multi-hot"):
        FocalLoss(multi_label=False, train_summary=summary(multi_hot))
    with pytest.raises(ValueError, match="loss.alpha=0.25 .* applies with multi_label=true only"):
        FocalLoss(alpha=0.25)


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "bce"])
def test_loss_configs_build_with_the_training_labels(name):
    cfg = OmegaConf.load(CONF / "loss" / f"{name}.yaml")
    cfg.num_classes, cfg.multi_label, cfg.class_weights = 2, False, "balanced"
    labels = torch.tensor([0, 0, 0, 1])
    loss = instantiate(cfg, train_summary=summary(labels))()  # the loss group is a partial: the task completes it
    assert loss(torch.zeros(4, 2), labels).item() > 0
    weights = resolve_class_weights("balanced", 2, summary(labels))
    assert weights[1] > weights[0]


@pytest.mark.slow
@pytest.mark.parametrize("loss_fn", [BinaryCrossEntropy(multi_label=True), FocalLoss(multi_label=True, alpha=0.25)],
                         ids=["bce", "focal"])
def test_multi_label_training_learns_multi_hot_targets(tmp_path, loss_fn):
    source = load_synthetic(image_size=8, in_channels=1, num_classes=3, num_train=192, num_val=48, num_test=48,
                            noise=0.1, multi_label=True)
    assert source.train.labels.shape == (192, 3) and source.train.labels.dtype == torch.float32
    assert (source.train.labels.sum(dim=1) >= 1).all() and (source.train.labels.sum(dim=1) > 1).any()
    data = DataModule(source, image_size=8, in_channels=1, num_classes=3, batch_size=16)
    torch.manual_seed(0)
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, embed_dim=32, depth=1,
                              num_heads=2, mlp_dim=64, drop_path=0.0)
    optimizer = build_optimizer(model, name="adamw", lr=3e-3, weight_decay=0.0)
    metrics = ClassificationMetrics(names=["accuracy", "auroc", "f1"], multi_label=True)
    trainer = Trainer(max_epochs=6, device="cpu", precision="32", compile=False, progress_bar=False,
                      monitor="val/auroc")
    task = Classification(loss=loss_fn, metrics=metrics, num_classes=3, multi_label=True)
    task.setup(data, model)
    untrained = trainer.validate(model, data, "val", task)
    logger = RunLogger(tmp_path / "job")
    trainer.fit(model, data, lambda images, targets: (images, targets), task, optimizer,
                constant(optimizer, total_steps=72, steps_per_epoch=12), logger, tmp_path / "job" / "checkpoints",
                seed=0, checkpoint_extra={})
    logger.finish("completed")
    trained = trainer.validate(model, data, "val", task)
    assert trained["val/loss"] < untrained["val/loss"]
    assert trained["val/auroc"] > 0.95 and trained["val/auroc"] > untrained["val/auroc"] + 0.2
    assert trained["val/acc"] > untrained["val/acc"] + 0.5  # exact match: every label of an image right
    assert set(trained) >= {"val/acc", "val/f1", "val/f1/class_0", "val/auroc/class_2"}
