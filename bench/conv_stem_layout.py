"""Why the conv stem runs channels-last: training step (forward + backward) time of experiment=cifar10_cpu's
model with its stem's input and weights channels-last (what PatchEmbed does) against the same model in
the default contiguous layout, side by side, in turns (so that other jobs on a shared machine slow both
alike), printed as a speed ratio. One thread by default: each of the recipe's two torchrun ranks has one.

    python bench/conv_stem_layout.py
    python bench/conv_stem_layout.py --threads 2 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from vitsweep.model import VisionTransformer

RECIPE = {"image_size": 32, "patch_size": 4, "conv_stem": [32, 64], "in_channels": 3, "num_classes": 10,
          "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, "pooling": "mean"}


class Contiguous(torch.nn.Module):
    """The patch embedding of `patch_embed` with its stem in the default layout (input and weights)."""

    def __init__(self, patch_embed):
        super().__init__()
        self.stem, self.proj = patch_embed.stem, patch_embed.proj
        self.to(memory_format=torch.contiguous_format)

    def forward(self, x):
        return self.proj(self.stem(x.contiguous())).flatten(2).transpose(1, 2)


def step_ms(model, images, labels, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        F.cross_entropy(model(images), labels).backward()
    return (time.perf_counter() - start) / steps * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (the recipe: 128 over 2 ranks)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15, help="steps per variant per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels_last = VisionTransformer(**RECIPE)
    contiguous = copy.deepcopy(channels_last)
    contiguous.patch_embed = Contiguous(contiguous.patch_embed)
    images, labels = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    with torch.no_grad():
        assert torch.allclose(channels_last(images), contiguous(images), atol=1e-5)  # the same function
    times = {"contiguous": [], "channels-last": []}
    for model in (contiguous, channels_last):
        step_ms(model, images, labels, 3)  # warm-up
    for _ in range(args.rounds):
        times["contiguous"].append(step_ms(contiguous, images, labels, args.steps))
        times["channels-last"].append(step_ms(channels_last, images, labels, args.steps))
    for name, values in times.items():
        print(f"{name:14s} {sum(values) / len(values):6.1f} ms/step  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"channels-last speed-up: {sum(times['contiguous']) / sum(times['channels-last']):.2f}x "
          f"(threads {args.threads}, batch {args.batch_size})")


if __name__ == "__main__":
    main()
