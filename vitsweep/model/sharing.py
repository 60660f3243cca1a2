"""Shared encoder weights across layers: ALBERT (Lan et al., 2020) and the Universal Transformer
(Dehghani et al., 2019) run one block's weights at every layer; `cycle` runs k distinct blocks in
turn (layer i uses block i mod k).

The model keeps one `Block` per layer (so hooks, figures and the layer count work as for any ViT),
but the layers that reuse a block hold the same attention projections and MLP modules (and norms,
unless `per_layer_norms`), so those parameters exist once, train once (their gradients add up over the
layers that use them), and count once. `model.state_dict()` names each shared tensor once, under
the first layer that uses it, so checkpoints hold it once; loading fills the other layers from it.
Each layer keeps its own attention module around the shared projections, so what depends on the
layer index (shifted windows on odd layers) and per-layer recording stay as without sharing.
"""

from __future__ import annotations

from torch import nn

SHARED_PARTS = ("attn.qkv", "attn.proj", "mlp")
NORMS = ("norm1", "norm2")


class NoSharing:
    """model/sharing=none: every layer has its own weights."""

    name = "none"
    per_layer_norms = True

    def schedule(self, depth: int) -> list[int]:
        """The block whose weights each layer runs."""
        return list(range(depth))


class ShareAll(NoSharing):
    """model/sharing=all: one block's weights at every layer (ALBERT, Universal Transformer);
    `per_layer_norms` gives each layer its own norm1 and norm2."""

    name = "all"

    def __init__(self, per_layer_norms: bool = False):
        self.per_layer_norms = per_layer_norms

    def schedule(self, depth):
        return [0] * depth


class Cycle(NoSharing):
    """model/sharing=cycle: `num_blocks` distinct blocks, layer i runs block i mod num_blocks."""

    name = "cycle"

    def __init__(self, num_blocks: int = 2, per_layer_norms: bool = False):
        if num_blocks < 1:
            raise ValueError(f"model.sharing.num_blocks={num_blocks} must be >= 1")
        self.num_blocks, self.per_layer_norms = num_blocks, per_layer_norms

    def schedule(self, depth):
        if self.num_blocks > depth:
            raise ValueError(f"model.sharing.num_blocks={self.num_blocks} exceeds model.depth={depth}: "
                             f"pick at most {depth} (or model/sharing=none)")
        return [layer % self.num_blocks for layer in range(depth)]


def tie_blocks(blocks: nn.ModuleList, sharing: NoSharing) -> dict[str, str]:
    """Make each layer's block reuse the modules of the block its schedule names. Returns the
    aliases {state-dict prefix of a reused module: prefix of its owner}, e.g.
    {"blocks.3.attn.qkv.": "blocks.0.attn.qkv."}."""
    parts = SHARED_PARTS + (() if sharing.per_layer_norms else NORMS)
    aliases = {}
    for layer, owner in enumerate(sharing.schedule(len(blocks))):
        if owner != layer:
            for part in parts:
                parent, _, name = part.rpartition(".")
                user = blocks[layer].get_submodule(parent) if parent else blocks[layer]
                setattr(user, name, blocks[owner].get_submodule(part))
                aliases[f"blocks.{layer}.{part}."] = f"blocks.{owner}.{part}."
    return aliases


def drop_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: name each shared tensor once (under the layer that owns it)."""
    for alias in module.shared_aliases:
        for key in [k for k in state_dict if k.startswith(prefix + alias)]:
            del state_dict[key]


def fill_aliases(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the layers that reuse a module load it from its owner's entries."""
    for alias, owner in module.shared_aliases.items():
        for key in [k for k in state_dict if k.startswith(prefix + owner)]:
            state_dict[prefix + alias + key[len(prefix + owner):]] = state_dict[key]
