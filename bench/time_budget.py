"""Test accuracy in a fixed wall-clock budget: vitsweep vs a plain timm + torchvision script.

Both train the same ViT shape (model=vit_cpu: patch 4, dim 128, depth 6, 4 heads, MLP 256,
drop path 0.1) on the same class-per-folder tree with the same recipe (AdamW lr 1e-3, wd 0.05,
cosine with 1 warmup epoch over --epochs, batch 128, random crop with padding 4 + flips, label
smoothing 0), each stopping at --minutes and then scoring the test split. The baseline is the
script a researcher writes by hand: ImageFolder + PIL transforms + DataLoader(workers) + a loop.

    python bench/time_budget.py --root ~/datasets/cifar10-jpeg --minutes 5 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import math
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


def baseline(root: Path, minutes: float, epochs: int, workers: int, batch_size: int = 128) -> dict:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
        drop_path_rate=0.1)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train = DataLoader(datasets.ImageFolder(str(root / "train"), train_tf), batch_size=batch_size, shuffle=True,
                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    test = DataLoader(datasets.ImageFolder(str(root / "test"), test_tf), batch_size=1000, num_workers=workers)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    total = epochs * len(train)
    warmup = len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    start, steps, done = time.time(), 0, False
    for epoch in range(epochs):
        model.train()
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            steps += 1
            if time.time() - start > minutes * 60:
                done = True
                break
        if done:
            break
    train_s = time.time() - start
    model.eval()
    correct = n = 0
    with torch.inference_mode():
        for images, labels in test:
            correct += (model(images).argmax(1) == labels).sum().item()
            n += len(labels)
    return {"test/acc": correct / n, "steps": steps, "train_s": train_s, "epochs": steps / len(train)}


def vitsweep(root: Path, minutes: float, epochs: int, workdir: Path) -> dict:
    # decoding the folder into the cache happens once per dataset; it is charged to the budget
    from vitsweep.data.imagefolder import load_imagefolder
    start = time.time()
    load_imagefolder(str(root), 32, 3, cache_dir=str(workdir / "cache"))
    decode_s = time.time() - start
    cmd = [sys.executable, str(ROOT / "run.py"), "data=imagefolder", f"data.root={root}", "data.image_size=32",
           f"data.mean={MEAN}", f"data.std={STD}", "model=vit_cpu", "augment=basic", f"trainer.max_epochs={epochs}",
           f"trainer.max_time={minutes * 60 - decode_s}", "trainer.progress_bar=false", "logger=none",
           "viz.enabled_at_end=false", f"paths.cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / 'run'}"]
    subprocess.run(cmd, check=True, cwd=workdir)
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    return {"test/acc": summary["metrics"]["test/acc"], "steps": summary["steps"],
            "train_s": summary["wall_time_s"], "epochs": summary["epochs_completed"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--epochs", type=int, default=8, help="schedule length for both (cosine over these epochs)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = vitsweep(args.root.expanduser(), args.minutes, args.epochs, Path(tmp))
    peer = baseline(args.root.expanduser(), args.minutes, args.epochs, args.workers)
    for name, r in (("vitsweep", ours), ("timm+torchvision", peer)):
        print(f"{name:18s} test/acc {r['test/acc']:.4f}  steps {r['steps']:6d}  epochs {r['epochs']:.2f}  "
              f"wall {r['train_s']:.0f}s")
    print(f"ratio: accuracy {ours['test/acc'] / peer['test/acc']:.2f}x, optimizer steps {ours['steps'] / peer['steps']:.2f}x")


if __name__ == "__main__":
    main()
