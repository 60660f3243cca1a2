"""Look inside a trained ViT: attention maps and rollout (`attention`), captum explanations
(`explain`), their figures and the drawing of the tasks' figures (`figures`: confusion matrix, scatter of
predictions, masks; each task picks its own), and the end-of-run report that the `viz` config group builds
(`report`)."""

from vitsweep.viz.attention import (
    attention_rollout,
    collect_attentions,
    patch_attention_maps,
    rollout_patch_map,
)
from vitsweep.viz.figures import (
    attention_figure,
    confusion_matrix_figure,
    explanation_figure,
    heatmaps_figure,
    image_to_rgb,
    save_figure,
    visualize_attention,
)

__all__ = [
    "attention_figure",
    "attention_rollout",
    "collect_attentions",
    "confusion_matrix_figure",
    "explanation_figure",
    "heatmaps_figure",
    "image_to_rgb",
    "patch_attention_maps",
    "rollout_patch_map",
    "save_figure",
    "visualize_attention",
]
