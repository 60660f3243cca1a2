"""Image time series: how the frames of a sample meet (the model/temporal config group).

A sample of T frames comes as (B, T, C, H, W) (vitsweep.data.inputs). The ViT trunk embeds every frame as
an image, the frames of a sample consecutive in the batch, (B * T, ...) (vitsweep.model.clip), and the
temporal component decides where frames exchange information:

    none         `FrameAverage`: nowhere. Each frame goes through the image model and the frames' pooled
                 vectors are averaged (TSN's average consensus): a bag of frames, blind to their order, so it
                 cannot tell a motion from its reverse. The baseline.
    factorised   `FactorisedEncoder`: ViViT's factorised encoder (Arnab et al. 2021, model 2). The spatial ViT
                 on each tubelet gives one vector per tubelet; a temporal transformer (`layers` pre-norm blocks,
                 its own cls token) reads them with a time encoding; its cls output is the sample's vector.
    divided      `DividedSpaceTime`: TimeSformer's divided space-time attention (Bertasius et al. 2021). Before
                 each block's spatial attention, every token attends to the tokens at its position in the
                 other frames of its sample (prefix tokens included: each frame has its own cls). The time
                 encoding is added to every token of a frame after the position embedding. The temporal
                 attention's output projection starts at zero, as TimeSformer's temporal_fc, so training starts
                 from the image model; the frames' pooled vectors are averaged.

Tubelets (`tubelet_size`, factorised and divided): ViViT's tubelet embedding (section 3.2) embeds t
consecutive frames together, their bands stacked into one patch embedding (a t x p x p kernel), so each token
already sees how its patch changes between those frames; the temporal component then works on the tubelets
as it would on frames. A short last tubelet repeats its last frame, and an image (T = 1) fills one tubelet.
With one frame per token (tubelet_size=1) neither learned the direction of a moving blob from scratch here
(the task of tests/test_temporal_learning.py, which tests the default of 2): a frame's pooled vector hardly depends on where the blob is at init, and
the direction needs two frames compared at the right places, a product of small weights to start from.
With tubelets of 2 both learn it within a few epochs; `none` never does (a bag of frames).

The time encoding (`time_encoding`) is `learned`: one vector per frame (or tubelet) position (up to
`max_frames`), or `dates`: Fourier features (sin, cos at `num_frequencies` periods from 1 day to
`max_period_days`) of each frame's day offset from the sample's earliest date, projected to the width; a
frame without a date gets a learned "unknown date" vector; a tubelet's date is the mean of its frames' known
dates. Either is layer-normalised to the scale of the tokens it is added to: at its init scale (0.02) it is
lost among them and the attention across frames starts blind to their order (divided, one frame per token,
lr 3e-3, 15 epochs: a non-wrapping motion learned in 0 of 3 seeds without the norm, 3 of 3 with it).

A single frame (T = 1) has no time to model: every component passes the image model's tokens and pooled
vector through unchanged, so a T = 1 batch gives the image model's outputs for the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from timm.layers import Mlp
from torch import nn

from vitsweep.model.attention import MultiHeadAttention
from vitsweep.model.clip import Clip
from vitsweep.model.compat import PATCH_GRID
from vitsweep.model.hooks import TrunkOption, TrunkPass

TIME_ENCODINGS = ("learned", "dates")


class Temporal(TrunkOption):
    """What the trunk asks of every temporal option (besides the hooks of hooks.py: `position`, `before_block`,
    `pool`); the defaults are frames that do not meet (`none`)."""

    tubelet_size = 1  # frames embedded together: the trunk's patch embedding takes this many frames' bands

    def tubelets(self, images: torch.Tensor, clip: Clip) -> tuple[torch.Tensor, Clip]:
        """(B * T, C, H, W) -> (B * T', k * C, H, W): k = tubelet_size consecutive frames stacked band-wise,
        T' = ceil(T / k) (a short last tubelet repeats its last frame); images (T = 1) fill a tubelet alike."""
        k = self.tubelet_size
        if k == 1:
            return images, clip
        frames = clip.by_sample(images)  # (B, T, C, H, W)
        B, T = frames.shape[:2]
        pad = -T % k
        dates = clip.dates
        if pad:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
            dates = None if dates is None else torch.cat([dates, dates.new_full((B, pad), math.nan)], dim=1)
        count = frames.shape[1] // k
        stacked = frames.reshape(B * count, k * frames.shape[2], *frames.shape[3:])  # frame by frame, bands inside
        dates = None if dates is None else dates.view(B, count, k).nanmean(dim=2)  # NaN: no date known
        return stacked, Clip(count, dates, clip.metadata)

    def pool(self, pooled: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """The frames' pooled vectors (B * T, D) -> the sample's vector (B, D): their mean."""
        return run.clip.frame_mean(pooled)

    def frame_weights(self, attentions: list[torch.Tensor], clip: Clip, batch: int) -> torch.Tensor:
        """(B, T), summing to 1: how much each of the B samples' vector draws on each of its frames, from the
        attention maps that `record_attention(model.temporal)` collected; uniform for a plain mean."""
        return torch.full((batch, clip.frames), 1 / clip.frames)

    def init_weights(self) -> None:
        """Init applied after the ViT's default one (which would overwrite it)."""


class FrameAverage(Temporal):
    """model/temporal=none: the image model on each frame, pooled vectors averaged (see the module docstring)."""

    def __init__(self, **trunk):
        super().__init__()


def check_tubelet_size(size) -> int:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"model.temporal.tubelet_size={size} must be a whole number >= 1 (frames embedded together; "
                         f"2 is ViViT's)")
    return size


class TimeEncoding(nn.Module):
    """One vector (D,) per frame of each sample, (B, T, D): learned per position, or from the dates."""

    def __init__(self, dim: int, kind: str = "learned", max_frames: int = 16, num_frequencies: int = 16,
                 max_period_days: float = 1000.0):
        super().__init__()
        if kind not in TIME_ENCODINGS:
            raise ValueError(f"model.temporal.time_encoding={kind!r} is not one of: {', '.join(TIME_ENCODINGS)}")
        if max_frames < 1:
            raise ValueError(f"model.temporal.max_frames={max_frames} must be >= 1")
        self.kind, self.max_frames = kind, max_frames
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(max_frames, dim))
            nn.init.trunc_normal_(self.weight, std=0.02)
            return
        if num_frequencies < 1 or max_period_days <= 1:
            raise ValueError(f"model.temporal.num_frequencies={num_frequencies} must be >= 1 and "
                             f"model.temporal.max_period_days={max_period_days} > 1")
        periods = torch.logspace(0, math.log10(max_period_days), num_frequencies, dtype=torch.float64)  # days
        self.register_buffer("frequencies", (2 * math.pi / periods).float(), persistent=False)  # (F,) rad/day
        self.proj = nn.Linear(2 * num_frequencies, dim)
        self.unknown = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.unknown, std=0.02)

    def forward(self, clip: Clip, batch: int) -> torch.Tensor:  # -> (B, T, D)
        if self.kind == "learned":
            if clip.frames > self.max_frames:
                raise ValueError(f"the samples have {clip.frames} frames, more than model.temporal.max_frames="
                                 f"{self.max_frames}: raise it (one learned vector per frame position)")
            return self.weight[:clip.frames].expand(batch, -1, -1)
        if clip.dates is None:
            raise ValueError("model.temporal.time_encoding=dates but the samples have no dates: give a dates column "
                             "(data=csv: data.source.dates_column) or set model.temporal.time_encoding=learned")
        dates = clip.dates.float()  # (B, T) days since 1970
        known = ~dates.isnan()
        start = torch.where(known, dates, math.inf).amin(dim=1, keepdim=True)  # the sample's earliest date
        offsets = torch.where(known, dates - torch.where(start.isinf(), 0.0, start), 0.0)  # (B, T) days, no NaN
        angles = offsets[..., None] * self.frequencies  # (B, T, F)
        encoded = self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))  # (B, T, D)
        return torch.where(known[..., None], encoded, self.unknown)


class TemporalBlock(nn.Module):
    """A pre-norm transformer block over a short sequence of frame vectors (B, 1 + T, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, norm: Callable[[int], nn.Module], qkv_bias: bool,
                 dropout: float, attention_dropout: float, max_frames: int):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, grid_size=(1, max_frames + 1), num_prefix_tokens=0,
                                       qkv_bias=qkv_bias, attn_drop=attention_dropout, proj_drop=dropout)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.GELU, drop=dropout)

    def forward(self, x):  # (B, S, D) -> (B, S, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FactorisedEncoder(Temporal):
    """model/temporal=factorised: ViViT's factorised encoder (see the module docstring). Hook: `pool`."""

    name = "factorised"

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, norm: Callable[[int], nn.Module] | None = None,
                 qkv_bias: bool = True, dropout: float = 0.0, attention_dropout: float = 0.0, layers: int = 2,
                 tubelet_size: int = 1, time_encoding: str = "learned", max_frames: int = 16,
                 num_frequencies: int = 16, max_period_days: float = 1000.0, **trunk):
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.temporal.layers={layers} must be >= 1 (the temporal transformer's depth)")
        self.tubelet_size = check_tubelet_size(tubelet_size)
        norm = norm or partial(nn.LayerNorm, eps=1e-6)
        self.time = TimeEncoding(dim, time_encoding, max_frames, num_frequencies, max_period_days)
        # the frames' vectors come out of the trunk's final norm, at unit scale: a time encoding at its init
        # scale (0.02) would be lost in them, and the temporal transformer would start blind to the order
        self.time_norm = norm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.blocks = nn.ModuleList(TemporalBlock(dim, num_heads, mlp_dim, norm, qkv_bias, dropout, attention_dropout,
                                                  max_frames) for _ in range(layers))
        self.norm = norm(dim)

    def pool(self, pooled, run):
        clip = run.clip
        if clip.frames == 1:
            return pooled  # one frame (or tubelet): the image model's vector
        frames = clip.by_sample(pooled)  # (B, T, D)
        frames = frames + self.time_norm(self.time(clip, frames.shape[0]))
        x = torch.cat([self.cls_token.expand(frames.shape[0], -1, -1), frames], dim=1)  # (B, 1 + T, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # (B, D): the temporal cls token

    def frame_weights(self, attentions, clip, batch):
        # the last temporal block's cls query over the frames, mean over heads: (B, nh, 1 + T, 1 + T) -> (B, T)
        if clip.frames == 1 or not attentions:
            return super().frame_weights(attentions, clip, batch)
        weights = attentions[-1][:, :, 0, 1:].mean(dim=1)
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


class TemporalAttention(nn.Module):
    """x + attention(norm(x)) over the frames of each token position, (B * N, T, D)."""

    def __init__(self, dim: int, num_heads: int, norm: Callable[[int], nn.Module], qkv_bias: bool, dropout: float,
                 attention_dropout: float, max_frames: int):
        super().__init__()
        self.norm = norm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, grid_size=(1, max_frames), num_prefix_tokens=0,
                                       qkv_bias=qkv_bias, attn_drop=attention_dropout, proj_drop=dropout)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class DividedSpaceTime(Temporal):
    """model/temporal=divided: TimeSformer's divided space-time attention (see the module docstring). Hooks:
    `position` (the time encoding), `before_block` (attention across frames), `pool` (the frames' mean). It
    attends across frames token by token, so it needs every patch token in place in every frame."""

    name = "divided"
    needs = frozenset({PATCH_GRID})

    def __init__(self, dim: int, depth: int, num_heads: int, norm: Callable[[int], nn.Module] | None = None,
                 qkv_bias: bool = True, dropout: float = 0.0, attention_dropout: float = 0.0, tubelet_size: int = 1,
                 time_encoding: str = "learned", max_frames: int = 16, num_frequencies: int = 16,
                 max_period_days: float = 1000.0, **trunk):
        super().__init__()
        self.tubelet_size = check_tubelet_size(tubelet_size)
        norm = norm or partial(nn.LayerNorm, eps=1e-6)
        self.time = TimeEncoding(dim, time_encoding, max_frames, num_frequencies, max_period_days)
        self.time_norm = norm(dim)  # the time encoding at the tokens' scale (module docstring)
        self.layers = nn.ModuleList(TemporalAttention(dim, num_heads, norm, qkv_bias, dropout, attention_dropout,
                                                      max_frames) for _ in range(depth))

    def init_weights(self):
        for layer in self.layers:  # TimeSformer: the temporal branch adds nothing at first
            nn.init.zeros_(layer.attn.proj.weight)
            nn.init.zeros_(layer.attn.proj.bias)

    def position(self, tokens, run):
        clip = run.clip
        if clip.frames == 1:
            return tokens
        time = self.time_norm(self.time(clip, tokens.shape[0] // clip.frames))  # (B, T, D)
        return tokens + time.flatten(0, 1)[:, None, :]  # every token of frame t gets frame t's vector

    def before_block(self, layer, tokens, run):
        if run.clip.frames == 1:
            return tokens
        BT, N, D = tokens.shape
        T = run.clip.frames
        x = tokens.view(BT // T, T, N, D).transpose(1, 2).reshape(-1, T, D)  # (B * N, T, D): one token across time
        x = self.layers[layer](x)
        return x.view(BT // T, N, T, D).transpose(1, 2).reshape(BT, N, D)

    def frame_weights(self, attentions, clip, batch):
        # the last block's attention across frames (B * N, nh, T, T), mean over tokens, heads and query frames
        if clip.frames == 1 or not attentions:
            return super().frame_weights(attentions, clip, batch)
        last = attentions[-1]
        weights = last.view(batch, -1, *last.shape[1:]).mean(dim=(1, 2, 3))  # (B, T)
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
