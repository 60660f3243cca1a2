"""What a run costs: the forward FLOP count matches a hand count for tiny ViTs (every attention
pattern), the wall clock charges each lap to its part, and a run's summary.json (and its W&B
summary) carry the whole cost block."""

import time

import pytest
import torch
from conftest import TINY_RUN, read_summary, run_cli

from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run
from vitsweep.model import VisionTransformer
from vitsweep.model.attention import LocalAttention, WindowedAttention
from vitsweep.trainer.cost import PARTS, WallClock, forward_flops, peak_memory, run_cost


def hand_count(image: int, patch: int, stride: int, channels: int, dim: int, depth: int, mlp: int, classes: int,
               cls_token: bool) -> int:
    """2 FLOPs per multiply-add of every matmul and convolution of one forward pass."""
    grid = (image - patch) // stride + 1
    patches = grid * grid
    tokens = patches + cls_token
    patch_embed = 2 * patches * dim * channels * patch * patch
    per_block = (2 * tokens * dim * 3 * dim  # qkv
                 + 2 * tokens * tokens * dim  # q @ k^T, all heads: sum over heads of tokens^2 * head_dim
                 + 2 * tokens * tokens * dim  # attention @ v
                 + 2 * tokens * dim * dim  # output projection
                 + 2 * tokens * dim * mlp * 2)  # fc1, fc2
    head = 2 * dim * classes
    return patch_embed + depth * per_block + head


@pytest.mark.parametrize(("image", "patch", "stride", "channels", "dim", "depth", "mlp", "pooling"), [
    (8, 4, 4, 3, 16, 2, 32, "cls"),
    (16, 4, 2, 1, 24, 3, 48, "mean"),  # overlapping patches: 7x7 tokens, no cls token
    (32, 8, 8, 13, 32, 1, 64, "cls"),  # multispectral
])
def test_forward_flops_match_a_hand_count(image, patch, stride, channels, dim, depth, mlp, pooling):
    model = VisionTransformer(image_size=image, patch_size=patch, patch_stride=stride, in_channels=channels,
                              num_classes=5, embed_dim=dim, depth=depth, num_heads=2, mlp_dim=mlp, pooling=pooling)
    expected = hand_count(image, patch, stride, channels, dim, depth, mlp, 5, cls_token=pooling == "cls")
    assert forward_flops(model, (channels, image, image)) == expected
    assert model.training  # counted in eval mode, then given back as it was


def test_masked_attention_counts_the_full_product_and_blocked_attention_less():
    """Local attention on a small grid runs as the masked product (every token pair); windowed attention
    runs per window (model/attention.py), so the counter sees fewer attention FLOPs than full."""
    from functools import partial

    def model(attention):
        return VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=5, embed_dim=16, depth=2,
                                 num_heads=2, mlp_dim=32, attention=attention)

    full = hand_count(16, 4, 4, 3, 16, 2, 32, 5, cls_token=True)
    assert forward_flops(model(partial(LocalAttention, kernel_size=3)), (3, 16, 16)) == full
    assert forward_flops(model(partial(WindowedAttention, window_size=2)), (3, 16, 16)) < full


def test_the_count_runs_on_meta_and_leaves_the_weights_alone():
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=3, num_classes=5, embed_dim=16, depth=1,
                              num_heads=2, mlp_dim=32)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    forward_flops(model, (3, 8, 8))
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_the_count_leaves_shared_weights_alone():
    """model/sharing reuses modules across layers: the count must not leave an alias on `meta`."""
    from vitsweep.model.sharing import ShareAll

    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, embed_dim=16, depth=3,
                              num_heads=2, mlp_dim=32, sharing=ShareAll())
    assert forward_flops(model, (1, 8, 8)) == hand_count(8, 4, 4, 1, 16, 3, 32, 3, cls_token=True)
    assert all(p.device.type == "cpu" for _, p in model.named_parameters(remove_duplicate=False))
    model(torch.zeros(2, 1, 8, 8))  # the shared blocks still run on real weights


def test_wall_clock_charges_each_lap_to_its_part():
    clock = WallClock()
    time.sleep(0.05)
    assert clock.lap("data") >= 0.05
    clock.lap("train")  # almost nothing since the last lap
    time.sleep(0.02)
    clock.lap("eval")
    assert clock.seconds["data"] >= 0.05 and clock.seconds["train"] < 0.02 <= clock.seconds["eval"]
    cost = run_cost(num_params=1000, flops_per_image=2_500_000, train_images=500, clock=clock,
                    device=torch.device("cpu"))
    assert cost["gflops_per_image"] == 0.0025 and cost["params"] == 1000
    assert cost["train_images_per_s"] == pytest.approx(500 / (clock.seconds["data"] + clock.seconds["train"]), rel=0.01)
    assert {f"time_{part}_s" for part in PARTS} <= set(cost)


def test_peak_memory_on_cpu_is_the_process_peak_resident_set():
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB that the process must have held at its peak
    mib, kind = peak_memory(torch.device("cpu"))
    assert kind == "process_peak_rss" and mib >= 64
    del held


@pytest.mark.slow
def test_every_run_records_its_cost_in_summary_and_wandb(tmp_path):
    run_cli([*TINY_RUN, "trainer.max_epochs=2", "model.patch_size=4"], tmp_path)
    summary = read_summary(tmp_path / "run")
    cost = summary["cost"]
    # data=synthetic: 16 px, 3 channels, 4 classes; TINY_MODEL: dim 32, depth 1, mlp 64
    assert cost["gflops_per_image"] == pytest.approx(hand_count(16, 4, 4, 3, 32, 1, 64, 4, True) / 1e9, rel=1e-5)
    assert cost["params"] == summary["num_params"]
    assert cost["train_images_per_s"] > 0 and cost["peak_memory_mib"] > 0
    assert cost["peak_memory_kind"] == "process_peak_rss"
    assert all(cost[f"time_{part}_s"] >= 0 for part in PARTS) and cost["time_train_s"] > 0
    assert sum(cost[f"time_{part}_s"] for part in PARTS) <= summary["wall_time_s"]
    assert summary["stop_reason"] == "max_epochs" and summary["budget"]["planned_steps"] == summary["steps"]
    [path] = find_offline_runs(tmp_path / "run")
    wandb_summary = read_offline_run(path).summary
    assert wandb_summary["cost/gflops_per_image"] == pytest.approx(cost["gflops_per_image"])
    assert wandb_summary["cost/train_images_per_s"] == pytest.approx(cost["train_images_per_s"])
    assert wandb_summary["stop_reason"] == "max_epochs"
