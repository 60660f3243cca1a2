"""Why the ViT decides: attributions of a class logit to the input, with captum.

Every method gives one heatmap per image. Gradient methods (saliency, ig, shap) attribute to
pixels, (B, H, W); the others work on the patch grid, (B, gh, gw): Grad-CAM on the token grid,
LIME with one superpixel per patch, and attention rollout. `explain` puts them all on the patch
grid by default (a pixel map summed over each patch's pixels), the unit a ViT sees.

Attributions are to the logit of `targets` (default: the predicted class), in eval mode.
Baselines are the all-zero image, which after normalization is the dataset mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import GradientShap, IntegratedGradients, LayerGradCam, Lime, Saliency
from torch import nn

from vitsweep.model.early_exit import record_exits
from vitsweep.model.vit import patch_pixels
from vitsweep.viz.attention import attention_rollout, collect_attentions, eval_mode, rollout_patch_map


def saliency(model, images, targets) -> torch.Tensor:
    """|d logit / d pixel|, max over bands (Simonyan et al., 2014): (B, H, W), non-negative."""
    images = images.detach().requires_grad_(True)  # captum would set it, with a warning
    attributions = Saliency(model).attribute(images, target=targets, abs=True)  # (B, C, H, W)
    return attributions.amax(dim=1)


def integrated_gradients(model, images, targets, baselines: torch.Tensor | None = None,
                         n_steps: int = 32, internal_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients (Sundararajan et al., 2017) from a black (zero) baseline. Returns the
    attributions (B, C, H, W) and the convergence delta (B,): sum of attributions minus
    (logit(image) - logit(baseline)), which is 0 for an exact integral (completeness).
    The n_steps points of the path run as one batch of B * n_steps images unless
    `internal_batch_size` caps it (for large models on small GPUs)."""
    baselines = torch.zeros_like(images) if baselines is None else baselines
    attributions, delta = IntegratedGradients(model).attribute(
        images, baselines=baselines, target=targets, n_steps=n_steps, internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    return attributions, delta


def gradient_shap(model, images, targets, n_samples: int = 16, stdevs: float = 0.1) -> torch.Tensor:
    """GradientSHAP (Lundberg & Lee, 2017): expected gradients x (input - baseline) over noisy
    inputs and a baseline distribution (black and the mean-colour image). (B, C, H, W), signed."""
    black = torch.zeros_like(images[:1])
    mean_colour = images.mean(dim=(0, 2, 3), keepdim=True).expand_as(black)
    baselines = torch.cat([black, mean_colour])  # (2, C, H, W)
    return GradientShap(model).attribute(images, baselines=baselines, target=targets,
                                         n_samples=n_samples, stdevs=stdevs)


def gradcam(model, images, targets, block: int = -1) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) on the patch tokens entering `block` (default: the last),
    laid out as a (B, D, gh, gw) feature map: ReLU(sum_d mean_grad_d * tokens_d). Returns (B, gh, gw).

    Why the tokens *entering* the last block, not leaving it: with cls pooling the logits read only
    the cls token of the final output, so the patch tokens leaving the last block have zero gradient
    and their Grad-CAM is blank. Entering it, they reach the cls token through its attention (the
    choice pytorch-grad-cam makes with `blocks[-1].norm1`). Mean pooling works either way.

    The glue: a block's input is a token sequence (B, N, D), and captum's LayerGradCam wants a layer
    whose output is a (B, C, h, w) feature map (it averages gradients over the axes after C). A forward pre-hook on the block reshapes its input
    patch tokens into a grid, passes the grid through an identity `tap` module that captum hooks, and
    flattens it back, so the network computes exactly what it did and captum sees a feature map.
    """
    prefix, (grid_h, grid_w) = model.num_prefix_tokens, model.grid_size
    tap = nn.Identity()

    def route_through_grid(module, args):
        tokens, *rest = args  # (B, N, D), then the block's other arguments (token sizes)
        batch, _, dim = tokens.shape
        grid = tokens[:, prefix:].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)  # (B, D, gh, gw)
        patches = tap(grid).flatten(2).transpose(1, 2)  # (B, P, D)
        return (torch.cat([tokens[:, :prefix], patches], dim=1), *rest)

    handle = model.blocks[block].register_forward_pre_hook(route_through_grid)
    try:
        # inputs that need grad keep the tapped tokens in the graph even when the trunk is frozen
        with record_exits(model):  # model/early_exit: run every block, the tapped one included
            cam = LayerGradCam(model, tap).attribute(images.detach().requires_grad_(True), target=targets,
                                                     relu_attributions=True)  # (B, 1, gh, gw)
    finally:
        handle.remove()
    return cam[:, 0].detach()


def patch_feature_mask(model, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) long: the index of the patch each pixel belongs to (for overlapping patches,
    the last patch that starts at or before it). Groups pixels into one superpixel per token."""
    _, (stride_h, stride_w) = patch_pixels(model.patch_embed)
    grid_h, grid_w = model.grid_size
    rows = (torch.arange(height) // stride_h).clamp(max=grid_h - 1)  # (H,)
    cols = (torch.arange(width) // stride_w).clamp(max=grid_w - 1)  # (W,)
    return (rows[:, None] * grid_w + cols[None, :])[None, None]


def lime(model, images, targets, n_samples: int = 128) -> torch.Tensor:
    """LIME (Ribeiro et al., 2016) with one superpixel per patch: fit a ridge regression of the
    target logit on which patches are kept (the others set to 0) over `n_samples` random
    perturbations; the coefficients are the patch scores. Returns (B, gh, gw), signed."""
    mask = patch_feature_mask(model, images.shape[-2], images.shape[-1]).to(images.device)
    explainer = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0))
    maps = []
    for image, target in zip(images, targets):  # one surrogate model per image
        coefficients = explainer.attribute(image[None], target=int(target), feature_mask=mask,
                                           baselines=0.0, n_samples=n_samples, perturbations_per_eval=32,
                                           return_input_shape=False)  # (1, P)
        maps.append(coefficients.reshape(*model.grid_size))
    return torch.stack(maps).detach()


def rollout(model, images, targets=None) -> torch.Tensor:
    """Attention rollout on the patch grid (B, gh, gw). Class-agnostic: `targets` is ignored."""
    _, attentions = collect_attentions(model, images)
    return rollout_patch_map(attention_rollout(attentions), model.num_prefix_tokens, model.grid_size,
                             model.cls_token is not None)


def to_patch_grid(pixel_map: torch.Tensor, model) -> torch.Tensor:
    """A pixel map (B, H, W) summed over each patch's pixels: (B, gh, gw). For non-overlapping
    patches the total is kept, so IG's completeness holds per token too."""
    (patch_h, patch_w), stride = patch_pixels(model.patch_embed)
    summed = F.avg_pool2d(pixel_map[:, None], kernel_size=(patch_h, patch_w), stride=stride) * (patch_h * patch_w)
    return summed[:, 0]


# name -> f(model, images, targets) -> heatmap (B, H, W) in pixels or (B, gh, gw) on the patch grid
# the methods that read a flat ViT token sequence, every patch token in place in every layer: refused for
# models without one (model=swin, token pruning), whose `keeps_token_grid` is false
NEEDS_TOKEN_GRID = ("rollout", "gradcam")
EXPLAINERS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": saliency,
    "ig": lambda model, images, targets: integrated_gradients(model, images, targets)[0].sum(dim=1),
    "gradcam": gradcam,
    "shap": lambda model, images, targets: gradient_shap(model, images, targets).sum(dim=1),
    "lime": lime,
    "rollout": rollout,
}


def explain(model, images: torch.Tensor, targets: torch.Tensor | list[int] | None,
            methods: list[str], per_patch: bool = True) -> dict[str, torch.Tensor]:
    """Heatmaps {method: (B, gh, gw)} for images (B, C, H, W) and the class `targets` (B,) to explain
    (None: the predicted class). With per_patch=False, pixel methods keep their (B, H, W) maps."""
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown:
        raise ValueError(f"explain: unknown method(s) {', '.join(unknown)}; valid: {', '.join(EXPLAINERS)}")
    device = next(model.parameters()).device
    images = images.detach().to(device)
    if targets is None:
        logits, _ = collect_attentions(model, images)
        targets = logits.argmax(dim=-1)
    targets = torch.as_tensor(targets, device=device).long()
    heatmaps = {}
    with eval_mode(model), torch.enable_grad():
        for method in methods:
            heatmap = EXPLAINERS[method](model, images.clone(), targets).detach()
            if per_patch and tuple(heatmap.shape[-2:]) != tuple(model.grid_size):
                heatmap = to_patch_grid(heatmap, model)
            heatmaps[method] = heatmap.float().cpu()
    return heatmaps
