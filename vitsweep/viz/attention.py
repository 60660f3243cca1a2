"""Where the ViT looks: per-head attention maps on the patch grid, and attention rollout.

All maps here are distributions over the patch grid (they sum to 1), so heads, layers and models
with cls or mean pooling read on the same scale.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vitsweep.model.attention import record_attention
from vitsweep.model.early_exit import record_exits


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout, no drop-path), then restore the model's training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_attentions(model, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (B, num_classes) and the attention probabilities of every layer, each (B, nh, N, N),
    for a batch of images (B, C, H, W), in eval mode."""
    # record_exits: with model/early_exit a batch would stop at its exits; the maps need every layer
    with eval_mode(model), record_exits(model), record_attention(model) as attentions:
        logits = model(images)
    return logits, attentions


def patch_attention_maps(attentions: list[torch.Tensor], num_prefix_tokens: int,
                         grid_size: tuple[int, int], has_cls_token: bool | None = None) -> torch.Tensor:
    """Per-layer, per-head attention on the patch grid: (B, L, nh, gh, gw).

    With a cls token, the map is the cls query's attention over the patches (what the summary token
    reads); without one (mean pooling) every patch feeds the output equally, so the map is the mean
    over the patch queries of the attention each patch receives. Prefix entries (cls, prompt tokens)
    are left out, and each map is renormalized to sum to 1 over the patches. `has_cls_token`
    (default: any prefix) says whether token 0 is a cls token; prompt tokens are prefix tokens too.
    """
    p = num_prefix_tokens
    has_cls_token = p > 0 if has_cls_token is None else has_cls_token
    stacked = torch.stack(attentions, dim=1)  # (B, L, nh, N, N)
    if has_cls_token:
        maps = stacked[:, :, :, 0, p:]  # (B, L, nh, P): cls query row
    else:
        maps = stacked[:, :, :, p:, p:].mean(dim=3)  # (B, L, nh, P): mean over patch queries
    maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(*maps.shape[:3], *grid_size)  # (B, L, nh, gh, gw)


def attention_rollout(attentions: list[torch.Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input
    token through all layers. Per layer, fuse the heads, add the identity for the residual path,
    renormalize rows, and multiply the layers together. Returns (B, N, N); every row sums to 1.

    head_fusion: mean | max | min over heads. discard_ratio: in each row, zero this fraction of the
    lowest attention weights before adding the identity (sharpens the map; 0 keeps all).
    """
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion={head_fusion!r} is not one of: mean, max, min")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio} must be in [0, 1)")
    rollout = None
    for attn in attentions:  # (B, nh, N, N)
        fused = getattr(attn, head_fusion)(dim=1)  # (B, N, N)
        if head_fusion != "mean":
            fused = fused.values
        n = fused.shape[-1]
        num_discard = int(n * discard_ratio)
        if num_discard > 0:
            lowest = fused.topk(num_discard, dim=-1, largest=False).indices  # (B, N, k)
            fused = fused.scatter(-1, lowest, 0.0)
        eye = torch.eye(n, device=fused.device, dtype=fused.dtype)
        layer = 0.5 * fused + 0.5 * eye  # the residual connection carries half the signal
        layer = layer / layer.sum(dim=-1, keepdim=True)  # (B, N, N), rows sum to 1
        rollout = layer if rollout is None else layer @ rollout  # later layers act on earlier mixes
    return rollout


def rollout_patch_map(rollout: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int],
                      has_cls_token: bool | None = None) -> torch.Tensor:
    """The rollout read on the patch grid, (B, gh, gw), summing to 1: the cls row over the patch
    columns with a cls token, else the mean of the patch rows (mean pooling averages the patches)."""
    p = num_prefix_tokens
    if (p > 0 if has_cls_token is None else has_cls_token):
        maps = rollout[:, 0, p:]  # (B, P)
    else:
        maps = rollout[:, p:, p:].mean(dim=1)  # (B, P)
    maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(-1, *grid_size)
