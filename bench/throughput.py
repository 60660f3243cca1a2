"""Side-by-side throughput, printed as ratios (vitsweep over its peer), in one run:

1. model: training images/s of vitsweep's VisionTransformer vs timm's VisionTransformer of the
   same shape (same embed dim, depth, heads, MLP, patch, pooling), same optimizer step;
2. input pipeline: images/s delivered as normalized, augmented training batches by vitsweep's
   in-memory uint8 tensors + batched on-device augmentation vs torchvision ImageFolder + PIL
   transforms (RandomCrop(pad 4), flip, ToTensor, Normalize) + DataLoader.

    python bench/throughput.py --root ~/datasets/cifar10-jpeg      # the CIFAR-10 JPEG tree
    python bench/throughput.py                                     # a generated 5,000-image tree
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from vitsweep.augment import Compose
from vitsweep.augment.geometric import Flips, RandomCrop
from vitsweep.data.datamodule import DataModule
from vitsweep.data.imagefolder import load_imagefolder
from vitsweep.model import VisionTransformer

SHAPE = {"image_size": 32, "patch_size": 4, "in_channels": 3, "num_classes": 10, "embed_dim": 128, "depth": 6, "num_heads": 4,
             "mlp_dim": 256}  # model=vit_cpu on CIFAR-10


def train_images_per_s(model, batch_size: int, steps: int, device) -> float:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def timm_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
        drop_path_rate=0.0)


def make_tree(root: Path, n: int = 5000) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 100)):
        for i in range(count):
            d = root / split / f"class_{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=75)


def pipeline_vitsweep(root: Path, cache_dir: Path, batch_size: int, device, max_batches: int) -> tuple[float, float]:
    start = time.perf_counter()
    splits = load_imagefolder(str(root), image_size=32, in_channels=3, cache_dir=str(cache_dir))
    decode_s = time.perf_counter() - start
    data = DataModule(splits, 32, 3, len(splits.class_names), batch_size=batch_size).to(device)
    augment = Compose(random_crop=RandomCrop(padding=4), flips=Flips(horizontal=0.5)).to(device)  # augment=basic
    start, n = time.perf_counter(), 0
    for i, (images, labels) in enumerate(data.train_batches(epoch=0, seed=0)):
        images, labels = augment(images, labels)
        images = data.normalize(images)
        n += images.shape[0]
        if i + 1 == max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), decode_s


def pipeline_torchvision(root: Path, batch_size: int, workers: int, max_batches: int) -> float:
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([0.5] * 3, [0.25] * 3)])
    ds = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False)
    start, n = time.perf_counter(), 0
    for i, (images, labels) in enumerate(loader):
        n += images.shape[0]
        if i + 1 == max_batches:
            break
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="class-per-folder tree with train/ and test/")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=100, help="input-pipeline batches to time")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the torchvision pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}")

    torch.manual_seed(0)
    ours = train_images_per_s(VisionTransformer(**SHAPE), args.batch_size, args.steps, device)
    peer = train_images_per_s(timm_vit(), args.batch_size, args.steps, device)
    print(f"model    vitsweep ViT {ours:8.0f} img/s | timm ViT {peer:8.0f} img/s | ratio {ours / peer:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "tree"
            make_tree(root)
        cache = Path(tmp) / "cache"
        pipeline_vitsweep(root, cache, args.batch_size, device, 2)  # first call decodes and fills the cache
        ours, load_s = pipeline_vitsweep(root, cache, args.batch_size, device, args.batches)
        peer = pipeline_torchvision(root, args.batch_size, args.workers, args.batches)
    print(f"pipeline vitsweep {ours:10.0f} img/s | ImageFolder+PIL+DataLoader({args.workers} workers) "
          f"{peer:8.0f} img/s | ratio {ours / peer:.1f}x  (cached load {load_s:.1f}s)")


if __name__ == "__main__":
    main()
