"""The trunk's hook points: where a research option plugs into the one block loop of `VisionTransformer`
(vit.py), and what one forward pass carries from hook to hook.

An option is a `TrunkOption` (model/prompt, model/temporal, model/metadata, model/early_exit) that overrides
the hooks it needs; every hook is the identity by default. The trunk calls each hook of every option, in the
order prompt, temporal, metadata, early exit:

    embed         position(tokens, run)              after the position embedding, on [cls, patches]:
                                                     temporal=divided (each frame's time encoding on its tokens)
                  prefix_tokens(batch, run)          tokens inserted after cls, in option order: prompts
                                                     (model/prompt), the metadata token (model/metadata=token)
    each block    before_block(layer, tokens, run)   deep prompts (this layer's own), temporal=divided
                                                     (attention across the frames of each token position)
                  (inside the block)                 model/token_pruning's reducer, between attention and MLP
                                                     (vit.py `Block`): fewer tokens leave the block
                  after_block(layer, tokens, run)    metadata=film (scale and shift); early exit (an exit
                                                     head: may drop the samples that leave, and end the loop
                                                     once none is left)
    pooling       pool(pooled, run)                  per frame (B * T, D) -> per sample (B, D): temporal (the
                                                     frames' mean, or ViViT's temporal transformer), then
                                                     metadata=late (joined with the metadata vector)
    output        output(out, run)                   the head's output -> the model's: early exit (each
                                                     sample's logits from the exit it left at)

Each option also says what it needs of the trunk (`needs`, names from compat.py): the one check at build
time (`compat.check_compatible`) refuses the combinations that cannot work, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitsweep.model.clip import Clip


@dataclass
class TrunkPass:
    """One forward pass through the trunk, besides its tokens.

    clip         the frames per sample, their dates, the metadata vector (clip.py); Clip() for images
    size         (B, N) the patches each token stands for once ToMe merged some; None: one each
    keep_blocks  blocks whose output tokens to keep in `hidden` (the task heads' reads_blocks)
    hidden       {block: its output tokens (B, N, D)}
    notes        what an option keeps between its own hooks during the pass, under its name (early exit:
                 the samples still running and the logits of those that left)
    """

    clip: Clip = field(default_factory=Clip)
    size: torch.Tensor | None = None
    keep_blocks: frozenset[int] = frozenset()
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


class TrunkOption(nn.Module):
    """An option of the trunk: `name` ("none" when off), what it `needs` of the trunk (compat.py), the prefix
    tokens it adds (`num_tokens`), and its hooks (module docstring), each the identity unless overridden."""

    name = "none"
    needs: frozenset[str] = frozenset()
    num_tokens = 0  # prefix tokens it inserts after cls (prefix_tokens)

    def position(self, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """[cls, patches] (B, N, D) after the position embedding -> the same, with what this option adds."""
        return tokens

    def prefix_tokens(self, batch: int, run: TrunkPass) -> torch.Tensor | None:
        """The (batch, num_tokens, D) tokens this option inserts after cls and the earlier options' ones."""
        return None

    def before_block(self, layer: int, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """The input (B, N, D) of block `layer` -> what the block reads."""
        return tokens

    def after_block(self, layer: int, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """The output (B, N, D) of block `layer` -> the next block's input. May return fewer samples (B', N, D),
        dropping their rows of run.size too: the loop ends once no sample is left."""
        return tokens

    def pool(self, pooled: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """The pooled vectors (B * T, D) (per frame, then per sample after temporal's hook) -> the same."""
        return pooled

    def output(self, out: torch.Tensor, run: TrunkPass):
        """The head's output of the samples that reached it -> the model's output."""
        return out
