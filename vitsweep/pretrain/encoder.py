"""The ViT encoder as the self-supervised methods run it: on the visible patches only (MAE), or on crops
of another size than the model's (DINO's local crops), with the encoder's own modules.

`encode` is `VisionTransformer.forward_features` (patch embedding, cls token, position embedding, blocks,
final norm) with two extra inputs; with neither it gives exactly what `forward_features` gives
(tests/test_pretrain.py checks that, so a change to the trunk that this file misses fails there).
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitsweep.model.temporal import FrameAverage


def full_attention(encoder: nn.Module) -> bool:
    """Whether every block attends to every token: the patterns of model/attention (local, windowed,
    sparse) are defined on the model's whole patch grid, so they cannot run on a subset of it."""
    return all(getattr(block.attn, "supports_token_reduction", False) for block in encoder.blocks)


def check_plain_encoder(encoder: nn.Module, method: str) -> None:
    """The methods pretrain the trunk that images go through: the research controls that change the token
    sequence (pruning, prompts) or the inputs (time series, metadata), or add heads (early exit), are
    for the fine-tuning run, on the pretrained encoder."""
    options = {"model/token_pruning": encoder.token_pruning.name != "none",
               "model/prompt": encoder.prompt.length > 0,
               "model/early_exit": encoder.early_exit.name != "none",
               "model/metadata": encoder.metadata.fusion != "none",
               "model/temporal": not isinstance(encoder.temporal, FrameAverage)}
    used = [group for group, on in options.items() if on]
    if used:
        raise ValueError(f"pretrain={method} pretrains the plain encoder, but {', '.join(used)} is set: pretrain "
                         f"with {' '.join(f'{group}=none' for group in used)}, then fine-tune with it")


def patch_tokens(encoder: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embeddings (B, P, D) of images of any size the patch grid tiles, and that grid (gh, gw)."""
    grid = encoder.patch_embed.grid(images)  # (B, D, gh, gw)
    return grid.flatten(2).transpose(1, 2), tuple(grid.shape[-2:])


def position_embedded(encoder: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[cls] + patch tokens (B, prefix + P, D) plus the position embedding; on a grid other than the
    model's, the embedding is resampled to it (bicubic, as timm does for other image sizes)."""
    if grid == tuple(encoder.grid_size):
        return encoder.pos_embed(tokens)
    weight = getattr(encoder.pos_embed, "weight", None)  # (1, prefix + gh * gw, D); none: model/pos_embed=none
    if weight is None:
        return encoder.pos_embed(tokens)
    resampled = resample_abs_pos_embed(weight, new_size=list(grid), old_size=list(encoder.grid_size),
                                       num_prefix_tokens=encoder.num_prefix_tokens)
    return tokens + resampled


def encode(encoder: nn.Module, images: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens (B, prefix + n, D) after the last block, normalized with cls pooling, of images (B, C, H, W).
    `visible` (B, n) lists the patch indices that go through the blocks (MAE); None keeps all of them.
    The position embedding is added before the selection, so each kept token knows where it was."""
    tokens, grid = patch_tokens(encoder, images)  # (B, P, D)
    prefix = encoder.num_prefix_tokens
    if encoder.cls_token is not None:
        tokens = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + P, D)
    tokens = encoder.pos_drop(position_embedded(encoder, tokens, grid))
    if visible is not None:
        index = visible[..., None].expand(-1, -1, tokens.shape[-1])  # (B, n, D)
        tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix:].gather(1, index)], dim=1)  # (B, prefix + n, D)
    size = None  # the blocks' token sizes (ToMe); the plain encoder never merges (check_plain_encoder)
    for block in encoder.blocks:
        tokens, size = block(tokens, size)
    if encoder.pooling == "cls":
        tokens = encoder.norm(tokens)
    return tokens


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The vector (B, D) the encoder hands its head (the cls token or the normalized patch mean): what a
    linear probe reads, and what the kNN monitor compares."""
    return encoder.forward_head(encode(encoder, images), pre_logits=True)
