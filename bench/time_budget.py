"""Test accuracy in a fixed wall-clock budget: the harness's CPU recipe against a plain timm +
torchvision script, side by side, for several budgets.

- vitsweep: `python run.py experiment=cifar10_cpu data=imagefolder ...` with `trainer.max_time` set to
  the budget (less the one-time decoding of the folder into the cache, which is charged to it). The
  recipe's lr schedule spans whatever the budget allows (trainer/budget.py).
- timm+torchvision: the script a researcher writes by hand: ImageFolder + PIL transforms + a
  DataLoader with workers + a loop, on the harness's former CPU model (timm ViT, patch 4, dim 128,
  depth 6, 4 heads, MLP 256, drop path 0.1), AdamW lr 1e-3, wd 0.05, batch 128, random crop with
  padding 4 + flips, and the lr annealed over the wall clock: linear warmup for the first 5% of the
  budget, then a cosine to 0 at its end, set before every step from the time elapsed. It trains on
  all 50k training images (no validation split) and stops when the budget is spent.

Both score the 10k test images after training (not charged to the budget). The machine's load
average is printed beside each run: on a shared machine the budgets buy fewer steps, and the two
sides may not get the same share of the cores, so compare ratios from a quiet machine.

    python bench/time_budget.py --root ~/datasets/cifar10-jpeg                 # budgets 120, 240, 600 s
    python bench/time_budget.py --root ~/datasets/cifar10-jpeg --budgets 240
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
WARMUP_SHARE = 0.05  # of the budget


def time_annealed_lr(base_lr: float, progress: float) -> float:
    """The peer's schedule, as a fraction `progress` of the wall-clock budget: linear warmup, then cosine to 0."""
    if progress < WARMUP_SHARE:
        return base_lr * progress / WARMUP_SHARE
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP_SHARE) / (1 - WARMUP_SHARE))))


def peer(root: Path, budget_s: float, workers: int, batch_size: int = 128, base_lr: float = 1e-3) -> dict:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
        drop_path_rate=0.1)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train = DataLoader(datasets.ImageFolder(str(root / "train"), train_tf), batch_size=batch_size, shuffle=True,
                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    test = DataLoader(datasets.ImageFolder(str(root / "test"), test_tf), batch_size=1000, num_workers=workers)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=base_lr, weight_decay=0.05)
    start, steps, load_before = time.time(), 0, os.getloadavg()[0]
    while time.time() - start < budget_s:
        model.train()
        for images, labels in train:
            progress = (time.time() - start) / budget_s
            if progress >= 1:
                break
            for group in optimizer.param_groups:
                group["lr"] = time_annealed_lr(base_lr, progress)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps += 1
    train_s = time.time() - start
    model.eval()
    correct = n = 0
    with torch.inference_mode():
        for images, labels in test:
            correct += (model(images).argmax(1) == labels).sum().item()
            n += len(labels)
    return {"test/acc": correct / n, "steps": steps, "train_s": train_s, "epochs": steps / len(train),
            "load": (load_before, os.getloadavg()[0])}


def vitsweep(root: Path, budget_s: float, workdir: Path, overrides: list[str], nproc: int = 1) -> dict:
    # decoding the folder into the cache happens once per dataset; it is charged to the budget
    from vitsweep.data.imagefolder import load_imagefolder
    start, load_before = time.time(), os.getloadavg()[0]
    load_imagefolder(str(root), 32, 3, cache_dir=str(workdir / "cache"))
    decode_s = time.time() - start
    run_dir = workdir / f"run_{budget_s:g}"
    launcher = [sys.executable] if nproc == 1 else [  # data-parallel on the CPU cores: torchrun, one thread a rank
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "run.py"), "experiment=cifar10_cpu", "data=imagefolder", f"data.root={root}",
           f"trainer.max_time={max(1.0, budget_s - decode_s):.1f}", "trainer.progress_bar=false", "logger=none",
           "viz.enabled_at_end=false", f"paths.cache_dir={workdir / 'cache'}", f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(cmd, check=True, cwd=workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cost = summary.get("cost") or {}
    return {"test/acc": summary["metrics"]["test/acc"], "steps": summary["steps"],
            "train_s": decode_s + cost.get("time_data_s", 0) + cost.get("time_train_s", 0) + cost.get("time_eval_s", 0),
            "epochs": summary["epochs_completed"], "load": (load_before, os.getloadavg()[0]),
            "images_per_s": cost.get("train_images_per_s")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the CIFAR-10 class-per-folder tree")
    parser.add_argument("--budgets", type=float, nargs="+", default=[120, 240, 600], help="seconds of training")
    parser.add_argument("--workers", type=int, default=2, help="the peer's DataLoader workers")
    parser.add_argument("--nproc", type=int, default=1,
                        help="vitsweep's processes: 1 = python run.py, N > 1 = torchrun --nproc_per_node N")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the vitsweep run (e.g. seed=1)")
    args = parser.parse_args()
    root = args.root.expanduser()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            ours = vitsweep(root, budget, Path(tmp), args.overrides, args.nproc)
            theirs = peer(root, budget, args.workers)
            results.append((budget, ours, theirs))
            for name, r in (("vitsweep", ours), ("timm+torchvision", theirs)):
                print(f"budget {budget:4.0f} s  {name:17s} test/acc {r['test/acc']:.4f}  steps {r['steps']:6d}  "
                      f"epochs {r['epochs']:5.2f}  trained {r['train_s']:5.0f} s  load {r['load'][0]:.1f}->"
                      f"{r['load'][1]:.1f}", flush=True)
    print("\nbudget   vitsweep   timm+torchvision   accuracy ratio")
    for budget, ours, theirs in results:
        print(f"{budget:4.0f} s   {ours['test/acc']:.4f}     {theirs['test/acc']:.4f}             "
              f"{ours['test/acc'] / theirs['test/acc']:.2f}x")


if __name__ == "__main__":
    main()
