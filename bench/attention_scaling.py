"""Restricted attention that costs what it attends to: training step (forward + backward) time of a
ViT with each `model/attention` pattern against full attention, side by side in one run, printed as
speed ratios (full time / pattern time; above 1 = faster than full). Each pattern also runs as the
dense masked product it replaced (`masked`, the reference in the tests), to show what blocking bought.

    python bench/attention_scaling.py                          # 512 px, patch 8: 4,096 tokens (the issue's target)
    python bench/attention_scaling.py --image-size 256         # 1,024 tokens
    python bench/attention_scaling.py --image-size 64 --patterns local   # small grids: local falls back to the mask

The model: embed 192, 3 heads, depth 4, MLP 768, cls token (the issue's measurement setting).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from vitsweep.model import VisionTransformer
from vitsweep.model.attention import LocalAttention, MultiHeadAttention, SparseAttention, WindowedAttention
from vitsweep.model.blocked_attention import split_heads

PATTERNS = {
    "full": partial(MultiHeadAttention),
    "windowed": partial(WindowedAttention, window_size=8, shift=True),
    "local": partial(LocalAttention, kernel_size=3),
    "axial": partial(SparseAttention, pattern="axial"),
    "strided": partial(SparseAttention, pattern="strided"),
}


def masked(pattern: partial) -> partial:
    """The same pattern computed as before: one SDPA over all (N, N) pairs with the boolean mask."""

    class Masked(pattern.func):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.full_mask = self.mask

        def attend(self, qkv, size, dropout_p):
            q, k, v = split_heads(qkv, self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.full_mask, dropout_p=dropout_p)
            return out.transpose(1, 2).flatten(2)

    return partial(Masked, **pattern.keywords)


def step_seconds(attention, image_size: int, patch_size: int, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, in_channels=3, num_classes=10,
                              embed_dim=192, depth=4, num_heads=3, mlp_dim=768, drop_path=0.0, attention=attention)
    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 10, (batch_size,))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]  # the median: other jobs share the machine


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--patterns", nargs="+", default=[p for p in PATTERNS if p != "full"])
    args = parser.parse_args()
    grid = args.image_size // args.patch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.image_size} px, patch "
          f"{args.patch_size}: {grid}x{grid} = {grid * grid} tokens + cls, batch {args.batch_size}, fwd+bwd, "
          f"median of {args.steps} steps")
    run = partial(step_seconds, image_size=args.image_size, patch_size=args.patch_size, batch_size=args.batch_size,
                  steps=args.steps)
    full = run(PATTERNS["full"])
    print(f"{'full':10s} {full * 1e3:9.0f} ms")
    for name in args.patterns:
        blocked, reference = run(PATTERNS[name]), run(masked(PATTERNS[name]))
        print(f"{name:10s} {blocked * 1e3:9.0f} ms  {full / blocked:5.2f}x full | masked {reference * 1e3:9.0f} ms  "
              f"{full / reference:5.2f}x full | blocked / masked {reference / blocked:5.2f}x")


if __name__ == "__main__":
    main()
