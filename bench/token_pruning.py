"""Token pruning at 196 tokens: inference images/s of ToMe and EViT against no pruning, side by side
in one run, printed as speed ratios with the accuracy delta of a short CIFAR-10 run.

The model is vit_cpu's (embed 128, depth 6, 4 heads, MLP 256) on CIFAR-10 resized to 28 px with
patch 2: a 14x14 grid, 196 patch tokens + cls. Each variant trains the same number of steps on the
same batches (pruning in training too), then is timed and scored on the test split. The unpruned
model's weights are also scored with pruning switched on at inference only ("off the shelf", as ToMe
reports), which needs no training: neither method has parameters.

    python bench/token_pruning.py --root ~/datasets/cifar10-jpeg        # ~30 min on 2 busy CPU cores
    python bench/token_pruning.py --root ~/datasets/cifar10-jpeg --steps 50 --test-images 1000   # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F

from vitsweep.data.datamodule import DataModule
from vitsweep.data.imagefolder import load_imagefolder
from vitsweep.model import VisionTransformer
from vitsweep.model.token_pruning import EViT, NoTokenPruning, ToMe

SHAPE = {"image_size": 28, "patch_size": 2, "in_channels": 3, "num_classes": 10, "embed_dim": 128, "depth": 6,
         "num_heads": 4, "mlp_dim": 256, "drop_path": 0.0}


def build(pruning) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**SHAPE, token_pruning=pruning)


def train(model, data: DataModule, steps: int, lr: float) -> float:
    """`steps` AdamW steps on the same seeded batches for every variant; returns seconds per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    torch.manual_seed(0)
    step, start = 0, time.perf_counter()
    for epoch in range(10**6):
        for images, labels in data.train_batches(epoch, seed=0):
            loss = F.cross_entropy(model(data.normalize(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                return (time.perf_counter() - start) / steps
    raise AssertionError("unreachable")


@torch.inference_mode()
def accuracy(model, data: DataModule) -> float:
    model.eval()
    correct = seen = 0
    for images, labels in data.eval_batches("test"):
        correct += (model(data.normalize(images)).argmax(-1) == labels).sum().item()
        seen += len(labels)
    return correct / seen


@torch.inference_mode()
def images_per_s(models: dict, batch_size: int, repeats: int) -> dict[str, float]:
    """Inference images/s of each model, timed in turns (round robin) so that load from other jobs on
    the machine falls on all of them alike; the median of `repeats` batches each."""
    images = torch.randn(batch_size, 3, SHAPE["image_size"], SHAPE["image_size"])
    times = {name: [] for name in models}
    for turn in range(repeats + 1):
        for name, model in models.items():
            model.eval()
            start = time.perf_counter()
            model(images)
            if turn:  # the first turn warms up
                times[name].append(time.perf_counter() - start)
    return {name: batch_size / sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CIFAR-10 as a class-per-folder tree (train/, test/)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of batch --batch-size per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--tome-r", type=int, default=16, help="ToMe: tokens merged per layer (196 -> 100 in 6 layers)")
    parser.add_argument("--evit-keep-rate", type=float, default=0.7, help="EViT: patch tokens kept at layers 1, 3, 4")
    parser.add_argument("--repeats", type=int, default=7, help="timed inference batches (batch 256) per variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 gives steadier ratios on a machine other jobs share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as cache:
        splits = load_imagefolder(args.root, image_size=SHAPE["image_size"], cache_dir=cache)
    # the test tree is read class by class: score a random subset, not the first classes
    subset = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))[:args.test_images]
    splits.test = splits.test.subset(subset)
    data = DataModule(splits, SHAPE["image_size"], 3, 10, batch_size=args.batch_size, eval_batch_size=500)
    variants = {"none": NoTokenPruning, f"tome r={args.tome_r}": partial(ToMe, r=args.tome_r),
                f"evit keep={args.evit_keep_rate}": partial(EViT, keep_rate=args.evit_keep_rate)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | CIFAR-10 at 28 px, patch 2: 196 tokens "
          f"+ cls | {args.steps} steps x {args.batch_size} images per variant, test on {args.test_images} images",
          flush=True)

    models, step_s, acc = {}, {}, {}
    for name, pruning in variants.items():
        models[name] = build(pruning)
        step_s[name] = train(models[name], data, args.steps, args.lr)
        acc[name] = accuracy(models[name], data)
        print(f"  trained {name}: {step_s[name] * 1e3:.0f} ms/step, test acc {acc[name]:.4f}", flush=True)
    speed = images_per_s(models, 256, args.repeats)
    for name, model in models.items():
        print(f"{name:16s} inference {speed[name]:7.0f} img/s  {speed[name] / speed['none']:5.2f}x none | trained "
              f"with it: test acc {acc[name]:.4f} ({acc[name] - acc['none']:+.4f} vs none) | train step "
              f"{step_s[name] * 1e3:5.0f} ms ({step_s['none'] / step_s[name]:4.2f}x none) | tokens {model.tokens_per_layer()}")
    for name, pruning in list(variants.items())[1:]:  # the unpruned weights, pruned at inference only
        model = build(pruning)
        model.load_state_dict(models["none"].state_dict())
        shelf = accuracy(model, data)
        print(f"{name:16s} off the shelf (none's weights): test acc {shelf:.4f} ({shelf - acc['none']:+.4f} vs none)")


if __name__ == "__main__":
    main()
