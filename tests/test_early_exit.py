"""model/early_exit=confidence: threshold 1.0 gives the full model's logits, threshold 0 sends every
sample out at the first exit, a threshold in between a mean depth in between; exit losses train the
exit heads; a sample that has left runs no further block; the exit metrics reach
summary.json through `python run.py`; bad values and tasks without class logits are refused in one line."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, read_summary, run_cli

from vitsweep.data.targets import ClassLabels
from vitsweep.loss import CrossEntropy
from vitsweep.model import VisionTransformer, create_vit
from vitsweep.model.early_exit import ConfidenceExit, exit_outputs, record_exits
from vitsweep.task import Classification, Regression, Segmentation

DEPTH, CLASSES = 6, 5
SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": CLASSES, "embed_dim": 32, "depth": DEPTH,
         "num_heads": 2, "mlp_dim": 64, "drop_path": 0.0}
BLOCKS = [1, 3]  # exits after layers 2 and 4, the final head after 6
LAYERS = [2, 4, DEPTH]


def exiting_vit(threshold, criterion="max_prob", **kwargs):
    torch.manual_seed(0)
    early_exit = partial(ConfidenceExit, blocks=BLOCKS, threshold=threshold, criterion=criterion, loss_weight=0.5)
    model = VisionTransformer(**{**SHAPE, **kwargs}, early_exit=early_exit)
    for head in model.early_exit.heads.values():  # spread the confidences of the freshly initialised exits
        torch.nn.init.normal_(head.fc.weight, std=1.0)
    return model.eval()


def exit_task(model, labels):
    task = Classification(loss=CrossEntropy(), num_classes=CLASSES)
    task.fit(ClassLabels("label").summarize(labels), [], model, None)
    task.check_early_exit(model)
    return task


def evaluate(model, images, labels):
    """What Trainer.validate does with an early-exit model, on one batch: the early-exited logits and the
    task's metrics (val/acc, exit_acc/<layer>, exit_share/<layer>, mean_depth)."""
    evaluator = exit_task(model, labels).evaluator()
    with torch.no_grad(), record_exits(model) as exits:
        logits = model(images)
    evaluator.update(exit_outputs(logits, exits), labels)
    with torch.no_grad():  # the evaluator's own forward records the same
        assert torch.equal(evaluator.forward(model, images)["exit_logits"], exit_outputs(logits, exits)["exit_logits"])
    return logits, exits, evaluator.compute("val")


IMAGES, LABELS = torch.randn(32, 3, 16, 16), torch.arange(32) % CLASSES


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_threshold_one_gives_the_full_models_logits(criterion):
    model = exiting_vit(1.0, criterion)
    full = VisionTransformer(**SHAPE).eval()  # the same trunk and final head, no exits
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("early_exit.") for k in unexpected)
    logits, exits, metrics = evaluate(model, IMAGES, LABELS)
    with torch.no_grad():
        assert torch.equal(logits, full(IMAGES))
        assert torch.equal(model(IMAGES), logits)  # without recording too
    assert exits.index.tolist() == [len(BLOCKS)] * 32
    assert metrics["val/mean_depth"] == DEPTH and metrics[f"val/exit_share/{DEPTH}"] == 1.0
    accuracy = (full(IMAGES).argmax(1) == LABELS).float().mean().item()
    assert metrics["val/acc"] == pytest.approx(accuracy) == metrics[f"val/exit_acc/{DEPTH}"]


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_threshold_zero_sends_every_sample_out_at_the_first_exit(criterion):
    model = exiting_vit(0.0, criterion)
    seen = []
    model.blocks[BLOCKS[0]].register_forward_hook(lambda m, args, out: seen.append(out[0]))
    logits, exits, metrics = evaluate(model, IMAGES, LABELS)
    with torch.no_grad():
        first_exit = model.early_exit.heads[str(BLOCKS[0])](seen[0])  # the first exit head on its block's tokens
    assert torch.equal(logits, first_exit) and torch.equal(exits.logits[0], first_exit)
    assert exits.index.tolist() == [0] * 32
    assert metrics["val/mean_depth"] == LAYERS[0] and metrics[f"val/exit_share/{LAYERS[0]}"] == 1.0
    assert metrics[f"val/exit_share/{LAYERS[1]}"] == metrics[f"val/exit_share/{DEPTH}"] == 0.0
    # each exit is still scored on every sample
    for e, layer in enumerate(LAYERS):
        accuracy = (exits.logits[e].argmax(1) == LABELS).float().mean().item()
        assert metrics[f"val/exit_acc/{layer}"] == pytest.approx(accuracy)


def test_a_threshold_in_between_gives_a_depth_in_between():
    probe = exiting_vit(1.0)
    with torch.no_grad(), record_exits(probe) as exits:  # every exit's confidence on these images
        probe(IMAGES)
    confidence = exits.logits[0].softmax(-1).amax(-1).sort().values  # (B,) at the first exit
    threshold = ((confidence[15] + confidence[16]) / 2).item()  # half the samples leave there
    model = exiting_vit(threshold)
    logits, exits, metrics = evaluate(model, IMAGES, LABELS)
    assert LAYERS[0] < metrics["val/mean_depth"] < DEPTH
    assert metrics[f"val/exit_share/{LAYERS[0]}"] == 0.5
    shares = [metrics[f"val/exit_share/{layer}"] for layer in LAYERS]
    assert sum(shares) == pytest.approx(1.0)
    assert metrics["val/mean_depth"] == pytest.approx(sum(s * layer for s, layer in zip(shares, LAYERS)))
    # each sample's logits are those of its exit, which is its first confident one (the final head: no exit was)
    confident = model.early_exit.confidence(exits.logits) > threshold  # (E+1, B)
    for i in range(32):
        e = exits.index[i].item()
        assert torch.equal(logits[i], exits.logits[e, i])
        assert not confident[:e, i].any() and (confident[e, i] or e == len(BLOCKS))
    # without recording, samples drop out of the batch as they leave: the same answers
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), logits, rtol=0, atol=1e-6)


def samples_per_block(model, images) -> list[int]:
    """How many samples each block ran on in one eval forward (0: the block did not run)."""
    counts = [0] * DEPTH
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: counts.__setitem__(i, counts[i] + len(out[0])))
    with torch.no_grad():
        model(images)
    return counts


def test_samples_that_left_run_no_further_block():
    assert samples_per_block(exiting_vit(0.0), IMAGES) == [32, 32, 0, 0, 0, 0]  # all left after layer 2
    assert samples_per_block(exiting_vit(1.0), IMAGES) == [32] * DEPTH  # nobody confident enough: full depth
    model = exiting_vit(1.0)
    model.early_exit.threshold = 0.0
    with record_exits(model):  # recording runs every block on every sample, to score every exit
        assert samples_per_block(model, IMAGES) == [32] * DEPTH
    # in between: those that left at layer 2 skip blocks 2-5, those that left at layer 4 blocks 4-5
    model = exiting_vit(0.0)
    with torch.no_grad(), record_exits(model) as exits:
        model(IMAGES)
    confidence = model.early_exit.confidence(exits.logits)  # (E+1, B)
    model.early_exit.threshold = confidence[0].median().item()
    with torch.no_grad(), record_exits(model) as exits:
        model(IMAGES)
    left_at = exits.index.bincount(minlength=3).tolist()  # samples leaving at layers 2, 4 and 6
    assert left_at[0] > 0 and left_at[1] + left_at[2] > 0
    expected = [32, 32, 32 - left_at[0], 32 - left_at[0], left_at[2], left_at[2]]
    assert samples_per_block(model, IMAGES) == expected


def test_training_adds_the_weighted_exit_losses_and_trains_the_exit_heads():
    model = exiting_vit(0.9).train()
    task = exit_task(model, LABELS)
    outputs = model(IMAGES)
    assert outputs["out"].shape == (32, CLASSES) and outputs["early_exits"].shape == (len(BLOCKS), 32, CLASSES)
    loss = task.loss(outputs, LABELS)
    expected = F.cross_entropy(outputs["out"], LABELS) + 0.5 * sum(
        F.cross_entropy(logits, LABELS) for logits in outputs["early_exits"])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, param in model.early_exit.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert task.batch_scores(outputs, LABELS)["acc"] >= 0  # scores read the final head


def test_exit_heads_pool_like_the_final_head_and_count_as_heads():
    model = exiting_vit(0.0, pooling="mean")
    seen = []
    model.blocks[BLOCKS[0]].register_forward_hook(lambda m, args, out: seen.append(out[0]))
    with torch.no_grad():
        logits = model(IMAGES)
        head = model.early_exit.heads[str(BLOCKS[0])]
        torch.testing.assert_close(logits, head.fc(head.norm(seen[0].mean(dim=1))))  # no prefix token: all patches
    linear_probe = create_vit(**SHAPE, trainable="head", early_exit=partial(ConfidenceExit, blocks=BLOCKS))
    trainable = {n for n, p in linear_probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", *(f"early_exit.{n}" for n, _ in
                                                        linear_probe.early_exit.named_parameters())}


def test_a_pretrained_trunk_loads_and_the_exit_heads_start_fresh(tmp_path):
    plain = VisionTransformer(**SHAPE)
    torch.save({"model": plain.state_dict(), "config": {}}, tmp_path / "best.pt")
    model = create_vit(**SHAPE, pretrained=str(tmp_path / "best.pt"), early_exit=partial(ConfidenceExit, blocks=BLOCKS))
    assert torch.equal(model.blocks[0].attn.qkv.weight, plain.blocks[0].attn.qkv.weight)
    fresh = {entry.split(" ")[0] for entry in model.load_report.reinitialized}
    assert fresh == {f"early_exit.{name}" for name in model.early_exit.state_dict()}


def test_default_blocks_are_a_third_and_two_thirds_of_the_depth():
    make = partial(ConfidenceExit, dim=8, num_classes=3, pooling="cls", num_prefix_tokens=1)
    assert make(depth=12).blocks == (4, 8) and make(depth=12).layers == [5, 9, 12]
    assert make(depth=3).blocks == (1,)  # 3 // 3 = 1 and 2 * 3 // 3 = 2, the last block, left out
    assert make(depth=2).blocks == (0,)


def test_bad_values_and_tasks_without_class_logits_are_refused_in_one_line():
    make = partial(ConfidenceExit, depth=DEPTH, dim=8, num_classes=3, pooling="cls", num_prefix_tokens=1)
    for kwargs, message in [({"blocks": [5]}, r"model.early_exit.blocks=\[5\] does not fit model.depth=6 .*\[0, 4\]"),
                            ({"blocks": [1, 1]}, r"model.early_exit.blocks=\[1, 1\] does not fit"),
                            ({"threshold": 1.5}, r"model.early_exit.threshold=1.5 is a confidence: .*\[0, 1\]"),
                            ({"criterion": "margin"}, r"model.early_exit.criterion='margin' is not one of: max_prob"),
                            ({"loss_weight": -1}, r"model.early_exit.loss_weight=-1 must be >= 0")]:
        with pytest.raises(ValueError, match=message) as error:
            make(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"model.early_exit.blocks=\[0\] does not fit model.depth=1.*depth >= 2"):
        make(depth=1, blocks=[0])
    early_exit = partial(ConfidenceExit, blocks=[0])
    shape = {**SHAPE, "depth": 2}
    seg = Segmentation(num_classes=4).model_args()
    with pytest.raises(ValueError, match=r"model/early_exit=confidence .* use model/early_exit=none with it"):
        VisionTransformer(**shape, **seg, early_exit=early_exit)
    aux = Classification(loss=CrossEntropy(), num_classes=CLASSES, aux_heads=["deep_supervision"]).model_args()
    with pytest.raises(ValueError, match=r"model/early_exit=confidence .*task.aux_heads"):
        VisionTransformer(**shape, **aux, early_exit=early_exit)
    regression = Regression(targets=["a", "b"])
    model = VisionTransformer(**{**shape, **regression.model_args()}, early_exit=early_exit)  # 2 outputs
    with pytest.raises(ValueError, match=r"model/early_exit=confidence .* task=regression: use model/early_exit=none"):
        regression.check_early_exit(model)
    multi_label = Classification(loss=CrossEntropy(), num_classes=2, multi_label=True)
    with pytest.raises(ValueError, match=r"task=classification with multi_label=true"):
        multi_label.check_early_exit(model)


@pytest.mark.slow
def test_exit_metrics_reach_the_summary_through_run_py(tmp_path):
    args = [*TINY_RUN, "model.depth=3", "model/early_exit=confidence", "model.early_exit.blocks=[0,1]",
            "model.early_exit.threshold=0.3", "logger=none"]
    run_cli(args, tmp_path / "ok")
    metrics = read_summary(tmp_path / "ok" / "run")["metrics"]
    for split in ("val", "test"):
        shares = [metrics[f"{split}/exit_share/{layer}"] for layer in (1, 2, 3)]
        assert sum(shares) == pytest.approx(1.0)
        assert metrics[f"{split}/mean_depth"] == pytest.approx(shares[0] + 2 * shares[1] + 3 * shares[2])
        assert 1 <= metrics[f"{split}/mean_depth"] <= 3 and f"{split}/acc" in metrics
        assert all(0 <= metrics[f"{split}/exit_acc/{layer}"] <= 1 for layer in (1, 2, 3))
    weights = torch.load(tmp_path / "ok" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert {"early_exit.heads.0.fc.weight", "early_exit.heads.1.fc.weight"} <= set(weights)
    bad = run_cli([*args, "model.early_exit.threshold=2"], tmp_path / "bad", check=False)
    assert bad.returncode == 2
    assert "error: model.early_exit.threshold=2" in bad.stderr and "Traceback" not in bad.stderr
