"""Why the ViT decides: captum attributions (saliency, IG, Grad-CAM, GradientSHAP, LIME) and rollout."""

from vitsweep.explain.figure import explanation_figure
from vitsweep.explain.methods import (
    EXPLAINERS,
    explain,
    gradcam,
    gradient_shap,
    integrated_gradients,
    lime,
    patch_feature_mask,
    rollout,
    saliency,
    to_patch_grid,
)

__all__ = [
    "EXPLAINERS",
    "explain",
    "explanation_figure",
    "gradcam",
    "gradient_shap",
    "integrated_gradients",
    "lime",
    "patch_feature_mask",
    "rollout",
    "saliency",
    "to_patch_grid",
]
