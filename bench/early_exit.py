"""Early exit: inference images/s, test accuracy and mean depth per threshold, side by side in one run,
printed as speed ratios against the same model without exits.

One ViT with exit heads after layers 2 and 4 of 6 (model/early_exit=confidence, exit losses weighted
1.0) trains on scikit-learn's digits (16 px, patch 4: 16 patch tokens + cls); training is the same
whatever the threshold, which only acts at inference. Each threshold is then timed on the test digits
(real images: where a sample leaves depends on it), in turns so that load from other jobs falls on all
alike, together with "no exits": the same trunk and final head without the exit heads (what threshold
1.0 computes, minus the heads).

    python bench/early_exit.py --threads 1 --repeats 21    # ~3 min on 1 core of the shared machine

Measured so (1 thread, shared 2-core machine, test acc of the model without exits 0.9750): threshold 1.0
0.83x its images/s (the exit heads' cost), 0.99 1.88x at mean depth 3.18 (acc +0.0000), 0.9 2.77x at
depth 2.29 (-0.0028), 0 3.20x at depth 2.00 (-0.0167).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from vitsweep.data.digits import load_digits
from vitsweep.model import VisionTransformer
from vitsweep.model.early_exit import ConfidenceExit, record_exits

SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 1, "num_classes": 10, "embed_dim": 64, "depth": 6,
         "num_heads": 4, "mlp_dim": 128, "drop_path": 0.0}
THRESHOLDS = (1.0, 0.999, 0.99, 0.95, 0.9, 0.8, 0.5, 0.0)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 255 - 0.5) / 0.5  # conf/data/digits.yaml's mean and std


def train(model, images, labels, steps: int, batch_size: int, lr: float) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        outputs = model(normalize(images[batch]))
        loss = F.cross_entropy(outputs["out"], labels[batch]) + sum(  # what Task.training_loss adds
            F.cross_entropy(exit_logits, labels[batch]) for exit_logits in outputs["early_exits"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.inference_mode()
def accuracy_and_depth(model, images, labels) -> tuple[float, float]:
    """Test accuracy of the early-exited predictions and the mean number of blocks run."""
    model.eval()
    with record_exits(model) as exits:
        logits = model(images)
    layers = torch.tensor(model.early_exit.layers, dtype=torch.float32)
    return (logits.argmax(-1) == labels).float().mean().item(), layers[exits.index].mean().item()


@torch.inference_mode()
def images_per_s(runs: dict, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Inference images/s of each run (a callable on the images), in turns; the median of `repeats`."""
    times = {name: [] for name in runs}
    for turn in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images)
            if turn:  # the first turn warms up
                times[name].append(time.perf_counter() - start)
    return {name: len(images) / sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--repeats", type=int, default=9, help="timed passes over the test digits per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_digits(image_size=SHAPE["image_size"])
    test_images, test_labels = normalize(splits.test.images), splits.test.labels
    torch.manual_seed(0)
    model = VisionTransformer(**SHAPE, early_exit=partial(ConfidenceExit, blocks=[1, 3]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | digits at 16 px, patch 4: 16 tokens + cls, "
          f"depth 6, exits after layers {model.early_exit.layers[:-1]} | {args.steps} steps x {args.batch_size}, "
          f"test on {len(test_labels)} digits in one batch", flush=True)
    start = time.perf_counter()
    train(model, splits.train.images, splits.train.labels, args.steps, args.batch_size, args.lr)
    print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    plain = VisionTransformer(**SHAPE).eval()  # the same trunk and final head, no exit heads
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("early_exit.")})

    def at(threshold):
        def run(images):
            model.early_exit.threshold = threshold
            return model(images)
        return run

    runs = {"no exits": plain, **{f"threshold {t}": at(t) for t in THRESHOLDS}}
    speed = images_per_s(runs, test_images, args.repeats)
    with torch.inference_mode():
        plain_acc = (plain(test_images).argmax(-1) == test_labels).float().mean().item()
    print(f"{'no exits':16s} {speed['no exits']:7.0f} img/s  1.00x no exits | test acc {plain_acc:.4f} | depth 6.00")
    for t in THRESHOLDS:
        model.early_exit.threshold = t
        acc, depth = accuracy_and_depth(model, test_images, test_labels)
        name = f"threshold {t}"
        print(f"{name:16s} {speed[name]:7.0f} img/s  {speed[name] / speed['no exits']:4.2f}x no exits | "
              f"test acc {acc:.4f} ({acc - plain_acc:+.4f}) | depth {depth:.2f}")


if __name__ == "__main__":
    main()
