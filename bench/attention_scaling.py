"""Restricted attention that costs what it attends to: training step (forward + backward) time of a
ViT with each `model/attention` pattern against full attention, side by side in one run, printed as
speed ratios (full time / pattern time; above 1 = faster than full). Each pattern also runs as the
dense masked product it replaced (`masked`, the reference in the tests), to show what blocking bought.
The variants run in turns, step by step, so that other jobs on a shared machine slow them alike.

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


def build(attention, image_size: int, patch_size: int) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=image_size, patch_size=patch_size, in_channels=3, num_classes=10,
                             embed_dim=192, depth=4, num_heads=3, mlp_dim=768, drop_path=0.0, attention=attention)


def step_seconds(models: dict, image_size: int, batch_size: int, steps: int) -> dict[str, float]:
    """Seconds per training step (forward + backward) of each model, run in turns (round robin) so
    that load from other jobs on the machine falls on all of them alike; the median of `steps`."""
    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 10, (batch_size,))
    times = {name: [] for name in models}
    for turn in range(steps + 1):
        for name, model in models.items():
            start = time.perf_counter()
            F.cross_entropy(model(images), labels).backward()
            if turn:  # the first turn warms up
                times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--patterns", nargs="+", default=[p for p in PATTERNS if p != "full"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 gives steadier ratios on a machine other jobs share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = args.image_size // args.patch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.image_size} px, patch "
          f"{args.patch_size}: {grid}x{grid} = {grid * grid} tokens + cls, batch {args.batch_size}, fwd+bwd, "
          f"median of {args.steps} steps, the variants in turns")
    models = {"full": build(PATTERNS["full"], args.image_size, args.patch_size)}
    for name in args.patterns:
        models[name] = build(PATTERNS[name], args.image_size, args.patch_size)
        models[f"{name} masked"] = build(masked(PATTERNS[name]), args.image_size, args.patch_size)
    seconds = step_seconds(models, args.image_size, args.batch_size, args.steps)
    full = seconds["full"]
    print(f"{'full':10s} {full * 1e3:9.0f} ms")
    for name in args.patterns:
        blocked, reference = seconds[name], seconds[f"{name} masked"]
        print(f"{name:10s} {blocked * 1e3:9.0f} ms  {full / blocked:5.2f}x full | masked {reference * 1e3:9.0f} ms  "
              f"{full / reference:5.2f}x full | blocked / masked {reference / blocked:5.2f}x")


if __name__ == "__main__":
    main()
