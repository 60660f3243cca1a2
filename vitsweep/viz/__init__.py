"""See what the ViT attends to: attention maps, attention rollout, and figures of them."""

from vitsweep.viz.attention import (
    attention_rollout,
    collect_attentions,
    patch_attention_maps,
    rollout_patch_map,
)
from vitsweep.viz.figures import (
    attention_figure,
    heatmaps_figure,
    image_to_rgb,
    save_figure,
    visualize_attention,
)

__all__ = [
    "attention_figure",
    "attention_rollout",
    "collect_attentions",
    "heatmaps_figure",
    "image_to_rgb",
    "patch_attention_maps",
    "rollout_patch_map",
    "save_figure",
    "visualize_attention",
]
