"""pretrain=dino: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers").

A student (the encoder plus a projection head) learns to match, on every crop of an image, what a
teacher outputs on the image's two global crops (vitsweep.pretrain.multicrop). The teacher is not
trained: after every optimizer step it moves towards the student, teacher = m * teacher + (1 - m) *
student, with m rising from `teacher_momentum` to 1 on a cosine over the run. Two things keep the
outputs from collapsing to one point: the teacher's outputs are centred (a running mean of them,
`center_momentum`, is subtracted) and sharpened (a low softmax temperature, `teacher_temp`, against the
student's `student_temp`).

Centring and sharpening act on the head's outputs, and they are not enough for a small ViT trained from
scratch for a short run (issue 12, digits): at init its pooled features are nearly the same for every
image (feature spread 0.084: a constant plus ~8% of image-dependent signal), so the teacher's targets
differ between images by a fraction of a nat, centring makes them near-uniform, and the student learns
to output that uniform distribution for every image by making its features constant (spread 0.013 after
5 epochs, teacher entropy log K). `koleo_weight` adds DINOv2's KoLeo regulariser (Oquab et al. 2023,
section 4; Sablayrolles et al. 2019, "Spreading vectors for similarity search"): the student's pooled
features of each global crop are pushed away from their nearest neighbour in the batch, which keeps the
encoder's features spread out while DINO's loss makes them invariant to the crops. On digits (15 epochs,
teacher_momentum 0.99) it gives a spread of 0.73 and a kNN accuracy of 0.62 (0.41 at init; without
KoLeo 0.05 and 0.43); the teacher's targets there still end close to uniform (entropy 5.53 of log K =
5.55): in runs that short KoLeo, not sharp prototypes, is what keeps the features apart.

The teacher's encoder is `encoder`: what the kNN monitor scores, what the attention figures show, and
what `model.pretrained=<best.pt>` loads for fine-tuning (the paper reports the teacher as the better
of the two). The student's encoder is `student`.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitsweep.model.compat import ANY_TOKENS, PLAIN_ENCODER, check_compatible
from vitsweep.pretrain.figures import teacher_attention_figures
from vitsweep.pretrain.multicrop import MultiCrop
from vitsweep.pretrain.objective import Pretraining, fixed_randomness


class DINOHead(nn.Module):
    """The projection head: an MLP (GELU) to a bottleneck, L2-normalized, then a weight-normalized linear
    layer with unit-norm rows to `out_dim` logits (the paper's head with norm_last_layer=True)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, num_layers: int = 3):
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(widths[-1], bottleneck_dim))
        self.last_layer = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.last_layer, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        return x @ F.normalize(self.last_layer, dim=1).T  # cosine logits, in [-1, 1]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per image (B,): -log of the distance from its L2-normalized features (B, D) to the nearest other
    image's of the batch (the Kozachenko-Leonenko entropy estimator, up to constants: lower when the
    features spread over the sphere). The neighbour is chosen without gradient; the distance has one."""
    normalized = F.normalize(features.float(), dim=-1)
    with torch.no_grad():
        similarity = normalized @ normalized.T
        similarity.fill_diagonal_(-2.0)  # never itself (cosines are >= -1)
        nearest = similarity.argmax(dim=1)
    return -torch.log((normalized - normalized[nearest]).norm(dim=-1) + eps)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, num_views: int) -> torch.Tensor:
    """Per image (B,): the cross entropy between the centred, sharpened teacher distribution of each of the
    2 global crops and the student's distribution of every other crop, averaged over those pairs.
    student_out (V * B, K) and teacher_out (2 * B, K) hold the crops one after the other."""
    teacher_probs = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).chunk(2)
    student_log_probs = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(num_views)
    total, pairs = 0.0, 0
    for t, probs in enumerate(teacher_probs):
        for s, log_probs in enumerate(student_log_probs):
            if s == t:  # the same crop: nothing to learn from matching it
                continue
            total = total + (-probs * log_probs).sum(dim=-1)  # (B,)
            pairs += 1
    return total / pairs


class DINOModel(nn.Module):
    name = "dino"

    def __init__(self, encoder: nn.Module, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 head_layers: int = 3, num_local_crops: int = 6, local_crop_size: int | None = None,
                 global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4), jitter: float = 0.4,
                 jitter_p: float = 0.8, blur_p: float = 0.5, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, teacher_momentum: float = 0.996, koleo_weight: float = 0.1):
        super().__init__()
        global_size = encoder.patch_embed.image_size[0]
        local_size = local_crop_size or default_local_crop_size(encoder)
        check_crop_size(encoder, local_size)
        # the plain encoder; local crops of another size give the blocks another patch grid
        self.local_crop_size = local_size
        self.needs = frozenset({PLAIN_ENCODER} | ({ANY_TOKENS} if local_size != global_size else set()))
        check_compatible(encoder, method=self)
        self.multicrop = MultiCrop(global_size, local_size, num_local_crops, global_crop_scale, local_crop_scale,
                                   jitter, jitter_p, blur_p)
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum, self.teacher_momentum = center_momentum, teacher_momentum
        self.koleo_weight = koleo_weight
        self.student = encoder
        self.student_head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers)
        self.encoder = copy.deepcopy(encoder)  # the teacher
        self.teacher_head = copy.deepcopy(self.student_head)
        for param in [*self.encoder.parameters(), *self.teacher_head.parameters()]:
            param.requires_grad_(False)  # moved by update_teacher, never by the optimizer
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("teacher_updates", torch.zeros((), dtype=torch.int64))
        # the data's normalization, to jitter brightness in the stored values (set by DINO.setup)
        channels = encoder.patch_embed.in_channels
        self.register_buffer("pixel_mean", torch.zeros(1, channels, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.ones(1, channels, 1, 1), persistent=False)
        self.total_steps: int | None = None  # the momentum schedule's length (DINO.attach); None: constant
        self.updates_seen: int | None = None  # teacher_updates on the host, to spare a device sync per step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "updates_seen", None))

    def no_weight_decay(self) -> set[str]:
        return {f"student.{name}" for name in self.student.no_weight_decay()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # the teacher never drops paths or tokens
        self.teacher_head.eval()
        return self

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student logits of every crop (V * B, K), teacher logits of the global crops (2 * B, K), and the
        student's pooled features of the global crops (2 * B, D), which KoLeo spreads."""
        views = self.multicrop(images, self.pixel_mean, self.pixel_std)
        global_views = torch.cat(views[:2])  # (2B, C, S, S)
        with torch.no_grad():
            teacher_out = self.teacher_head(pooled(self.encoder, global_views))
        student_features = pooled(self.student, global_views)
        student_out = [self.student_head(student_features)]
        if len(views) > 2:  # the local crops: one forward at their smaller size (the trunk takes any grid)
            student_out.append(self.student_head(pooled(self.student, torch.cat(views[2:]))))
        return torch.cat(student_out), teacher_out, student_features

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
             student_features: torch.Tensor) -> torch.Tensor:
        """Per image (B,): the DINO loss, plus koleo_weight times KoLeo averaged over the 2 global crops
        (each crop's nearest neighbour is sought among the same crop of the other images, as in DINOv2)."""
        num_views = 2 + self.multicrop.num_local_crops
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, self.teacher_temp, num_views)
        if self.koleo_weight:
            koleo = sum(koleo_loss(crop) for crop in student_features.chunk(2)) / 2
            loss = loss + self.koleo_weight * koleo
        return loss

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            student_out, teacher_out, student_features = self.outputs(images)
            loss = self.loss(student_out, teacher_out, student_features)
            if torch.is_grad_enabled():  # a training step; not the build's one-forward check (no gradients, one
                self.update_center(teacher_out)  # rank at a time: a collective there would wait for the others)
            return {"loss": loss.mean()}
        with fixed_randomness(images.device):  # the same crops at every evaluation
            student_out, teacher_out, student_features = self.outputs(images)
        loss = self.loss(student_out, teacher_out, student_features)
        return {"features": pooled(self.encoder, images), "loss": loss}

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center = center_momentum * center + (1 - center_momentum) * the mean teacher output of the batch
        (of the global batch, data-parallel)."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)

    def momentum(self, step: int) -> float:
        """The teacher's momentum after `step` updates: teacher_momentum -> 1 on a cosine over total_steps."""
        if not self.total_steps:
            return self.teacher_momentum
        progress = min(step / self.total_steps, 1.0)
        return 1 - (1 - self.teacher_momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher = m * teacher + (1 - m) * student, parameters and (batch norm) buffers alike."""
        if self.updates_seen is None:
            self.updates_seen = int(self.teacher_updates)  # once per run (and after a load)
        m = self.momentum(self.updates_seen)
        teacher = [*self.encoder.parameters(), *self.teacher_head.parameters()]
        student = [*self.student.parameters(), *self.student_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1 - m)
        for teacher_buffer, student_buffer in zip(self.encoder.buffers(), self.student.buffers()):
            teacher_buffer.copy_(student_buffer)
        self.updates_seen += 1
        self.teacher_updates.fill_(self.updates_seen)


def pooled(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) of any size the patches tile -> the encoder's pooled features (B, D), what its head
    reads (and the kNN monitor compares)."""
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)


def default_local_crop_size(encoder: nn.Module) -> int:
    """DINO's 96 px local crops for 224 px global ones (3/7), rounded to a size the patches tile."""
    patch, stride = encoder.patch_embed.patch_size[0], encoder.patch_embed.stride[0]
    return patch + max(0, round((encoder.patch_embed.image_size[0] * 3 / 7 - patch) / stride)) * stride


def check_crop_size(encoder: nn.Module, size: int) -> None:
    patch, stride = encoder.patch_embed.patch_size[0], encoder.patch_embed.stride[0]
    if size < patch or (size - patch) % stride:
        raise ValueError(f"pretrain.local_crop_size={size} is not tiled by model.patch_size={patch} (stride {stride}): "
                         f"use {patch} + a multiple of {stride}")


class DINO(Pretraining):
    """conf/pretrain/dino.yaml: the method's settings, checked before anything is built."""

    name = "dino"

    def __init__(self, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128, head_layers: int = 3,
                 num_local_crops: int = 6, local_crop_size: int | None = None, global_crop_scale=(0.4, 1.0),
                 local_crop_scale=(0.05, 0.4), jitter: float = 0.4, jitter_p: float = 0.8, blur_p: float = 0.5,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9,
                 teacher_momentum: float = 0.996, koleo_weight: float = 0.1, **shared):
        super().__init__(**shared)
        for key, value in (("teacher_momentum", teacher_momentum), ("center_momentum", center_momentum)):
            if not 0 <= value < 1:
                raise ValueError(f"pretrain.{key}={value} must be in [0, 1), e.g. 0.996 (teacher) or 0.9 (centre)")
        for key, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if value <= 0:
                raise ValueError(f"pretrain.{key}={value} must be > 0")
        for key, scale in (("global_crop_scale", global_crop_scale), ("local_crop_scale", local_crop_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"pretrain.{key}={list(scale)} must be [low, high] shares of the image's area, "
                                 f"0 < low <= high <= 1")
        if not koleo_weight >= 0:
            raise ValueError(f"pretrain.koleo_weight={koleo_weight} must be >= 0, e.g. 0.1 (DINOv2's), or 0 for "
                             f"DINO without the KoLeo regulariser")
        if num_local_crops < 0 or head_layers < 1:
            raise ValueError(f"pretrain.num_local_crops={num_local_crops} must be >= 0 and pretrain.head_layers="
                             f"{head_layers} >= 1")
        self.settings = {
            "out_dim": out_dim, "hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim, "head_layers": head_layers,
            "num_local_crops": num_local_crops, "local_crop_size": local_crop_size,
            "global_crop_scale": tuple(global_crop_scale), "local_crop_scale": tuple(local_crop_scale),
            "jitter": jitter, "jitter_p": jitter_p, "blur_p": blur_p, "student_temp": student_temp,
            "teacher_temp": teacher_temp, "center_momentum": center_momentum, "teacher_momentum": teacher_momentum,
            "koleo_weight": koleo_weight}

    def wrap(self, model: nn.Module) -> DINOModel:
        self.check_encoder(model)
        return DINOModel(model, **self.settings)

    def setup(self, data, model: DINOModel) -> None:
        super().setup(data, model)
        model.pixel_mean.copy_(data.mean.view(1, -1, 1, 1).to(model.pixel_mean.device))
        model.pixel_std.copy_(data.std.view(1, -1, 1, 1).to(model.pixel_std.device))

    def attach(self, model: DINOModel, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """The teacher follows the student after every optimizer step (a step skipped by the fp16 loss
        scaler does not call the hook, and moves neither)."""
        model.total_steps = total_steps
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: model.update_teacher())

    def sample_figures(self, model: DINOModel, images, outputs, targets, titles, style) -> dict:
        """The teacher encoder's attention, per image (each head of the last layer, and the rollout)."""
        return teacher_attention_figures(model.encoder, images, titles, **style)
