"""pretrain=mae: masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Hide a random `mask_ratio` of each image's patches; the encoder sees the visible ones only (with their
position embeddings, so it knows where they are); a light decoder (timm `Block`s) takes the encoded
visible tokens plus a learned mask token at every hidden position, and predicts each hidden patch's
pixels. The loss is the mean squared error on the hidden patches only, against each patch's pixels
normalized by that patch's own mean and variance (the paper's `norm_pix_loss`, which it finds gives
better features): predicting 0 everywhere scores 1.0, whatever the data.

Patches are the encoder's own: `model.patch_size` windows every `model.patch_stride` pixels, over all
bands, so any channel count and overlapping patches work. The encoder is the trunk itself, run on the
visible patches (`encoder.forward_features(images, visible=...)`): it must be the plain encoder and attend
fully (`model/attention=full`: the other patterns are masks over the whole patch grid), the needs this
method declares to the model's one check (vitsweep/model/compat.py).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitsweep.model.compat import ANY_TOKENS, PLAIN_ENCODER, check_compatible
from vitsweep.model.pos_embed import sincos_2d
from vitsweep.pretrain.figures import reconstruction_figure
from vitsweep.pretrain.objective import Pretraining, fixed_randomness
from vitsweep.pretrain.patches import normalize_patches, patchify


def random_masking(batch: int, num_patches: int, num_visible: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a uniformly random set of `num_visible` patches to keep: their indices (B, n) and the
    hidden-patch mask (B, P), True where hidden; every image hides exactly P - n patches."""
    noise = torch.rand(batch, num_patches, device=device)
    visible = noise.argsort(dim=1)[:, :num_visible]  # (B, n)
    hidden = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    hidden.scatter_(1, visible, False)
    return visible, hidden


class MaskedAutoencoder(nn.Module):
    name = "mae"
    needs = frozenset({PLAIN_ENCODER, ANY_TOKENS})  # the plain encoder, run on the visible patches only

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_num_heads: int = 4):
        super().__init__()
        check_compatible(encoder, method=self)
        self.encoder = encoder
        self.num_patches = encoder.patch_embed.num_patches
        self.num_visible = self.num_patches - round(mask_ratio * self.num_patches)
        if not 0 < self.num_visible < self.num_patches:
            raise ValueError(f"pretrain.mask_ratio={mask_ratio} hides {self.num_patches - self.num_visible} of "
                             f"{self.num_patches} patches: hide at least one and keep at least one")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size, self.stride = encoder.patch_embed.patch_size[0], encoder.patch_embed.stride[0]
        self.image_size = tuple(encoder.patch_embed.image_size)
        prefix = encoder.num_prefix_tokens

        # the light decoder: its own width, fixed 2-D sin-cos positions (zero for cls), a linear pixel head
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        decoder_pos = torch.cat([torch.zeros(prefix, decoder_dim), sincos_2d(encoder.grid_size, decoder_dim)])
        self.register_buffer("decoder_pos", decoder_pos[None], persistent=False)  # (1, prefix + P, Dd)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, encoder.patch_embed.in_channels * self.patch_size**2)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token"}

    def decode(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens (B, prefix + n, D) -> predicted pixels of every patch (B, P, C * p * p)."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + n, Dd)
        B, _, width = x.shape
        index = visible[..., None].expand(-1, -1, width)  # (B, n, Dd)
        patches = torch.scatter(self.mask_token.expand(B, self.num_patches, width), 1, index, x[:, prefix:])
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos  # (B, prefix + P, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x)[:, prefix:])  # (B, P, C * p * p)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For model inputs (B, C, H, W): each image's loss (B,), the predicted patches (B, P, C * p * p)
        (normalized per patch with norm_pix_loss) and the hidden-patch mask (B, P)."""
        visible, hidden = random_masking(images.shape[0], self.num_patches, self.num_visible, images.device)
        latent = self.encoder.forward_features(images, visible=visible)  # (B, prefix + n, D)
        if self.encoder.pooling != "cls":  # mean pooling normalizes the pooled vector only; MAE normalizes tokens
            latent = self.encoder.norm(latent)
        predicted = self.decode(latent, visible)
        target = patchify(images, self.patch_size, self.stride)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        error = (predicted.float() - target.float()).square().mean(dim=-1)  # (B, P)
        loss = (error * hidden).sum(dim=1) / hidden.sum(dim=1)  # (B,): hidden patches only
        return loss, predicted, hidden

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            return {"loss": self.reconstruct(images)[0].mean()}
        with fixed_randomness(images.device):  # the same masks at every evaluation
            loss = self.reconstruct(images)[0]
        features = self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)  # (B, D)
        return {"features": features, "loss": loss}


class MAE(Pretraining):
    """conf/pretrain/mae.yaml: the method's settings, checked before anything is built."""

    name = "mae"

    def __init__(self, mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_num_heads: int = 4, **shared):
        super().__init__(**shared)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"pretrain.mask_ratio={mask_ratio} is the share of patches hidden: use a value in (0, 1), "
                             f"e.g. 0.75")
        if decoder_dim % 4 or decoder_dim % decoder_num_heads:
            raise ValueError(f"pretrain.decoder_dim={decoder_dim} must be divisible by 4 (sin-cos positions) and by "
                             f"pretrain.decoder_num_heads={decoder_num_heads}")
        if decoder_depth < 1:
            raise ValueError(f"pretrain.decoder_depth={decoder_depth} must be >= 1")
        self.settings = {"mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss, "decoder_dim": decoder_dim,
                         "decoder_depth": decoder_depth, "decoder_num_heads": decoder_num_heads}

    def wrap(self, model: nn.Module) -> MaskedAutoencoder:
        self.check_encoder(model)
        return MaskedAutoencoder(model, **self.settings)

    def sample_figures(self, model: MaskedAutoencoder, images, outputs, targets, titles, style) -> dict:
        """The reconstructions: per image, the input, the visible patches, the prediction, and the prediction
        in the hidden patches."""
        return {"reconstructions": reconstruction_figure(model, images, titles, **style)}
