"""A Vision Transformer from scratch (Dosovitskiy et al., 2020), in the shape of timm's.

Module names follow timm's `VisionTransformer` (patch_embed.proj, cls_token, blocks.i.attn.qkv,
blocks.i.mlp.fc1, norm, head), so timm weights port with little renaming (see pretrained.py).
The attention pattern, the norm layer, the position embedding and weight sharing are components injected
by the config groups model/attention, model/norm, model/pos_embed and model/sharing.

One block loop, `forward_features`, serves every use of the trunk: classification and the task heads,
early exit, MAE's encoder (the visible patches only: `visible=`), DINO's local crops (images of any size the
patches tile: the position embedding is resampled to their grid). The research options plug into it at
named hook points (hooks.py), each in its own module, each declaring what it needs of the trunk:

    embed           patches -> [cls, prompts (model/prompt), metadata token (model/metadata=token), patches]
                    + position embedding (+ each frame's time encoding: model/temporal=divided)
    before a block  deep prompts (this layer's own), model/temporal=divided (attention across frames)
    in a block      model/token_pruning (EViT, ToMe: fewer tokens between attention and MLP)
    after a block   model/metadata=film; model/early_exit (an exit head; samples that leave drop out)
    pooling         cls or patch mean (pooling.py), then the frames of a sample (model/temporal), then
                    model/metadata=late
    output          model/early_exit: each sample's logits from where it left

Which options combine is decided once, when the model is built (compat.py).

The head is timm's `nn.Linear` on the pooled vector unless a task gives a `TaskHead` factory
(`head=`, plus `aux_heads=` trained alongside it; see heads.py): then the trunk hands the head the
`Features` it asks for, and in training mode with auxiliary heads `forward` returns
{"out": main output, <aux name>: aux output, ...} (torchvision's segmentation models do the same).

Image time series and metadata (model/temporal, model/metadata): `forward` also takes frames (B, T, C, H, W)
or an `Inputs` with metadata and dates (vitsweep.data.inputs). Every frame is embedded as an image, the
frames of a sample consecutive in the batch (vitsweep.model.clip carries what the options need). With the
defaults (`none`) and images the model is the plain ViT.

The class only builds modules: no file is read here. Pretrained weights and freezing are applied
afterwards by the factory that the model configs target (`vitsweep.model.factory.create_vit`).
Attention maps are collected with `vitsweep.model.attention.record_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from vitsweep.model.attention import MultiHeadAttention, record_attention
from vitsweep.model.clip import Clip, unpack
from vitsweep.model.compat import SINGLE_IMAGES, check_compatible
from vitsweep.model.early_exit import NoEarlyExit
from vitsweep.model.heads import Features, TaskHead
from vitsweep.model.hooks import TrunkOption, TrunkPass
from vitsweep.model.metadata import MetadataInput
from vitsweep.model.pooling import POOLINGS, pool_tokens
from vitsweep.model.pos_embed import LearnedPositionEmbedding
from vitsweep.model.prompt import NoPrompt
from vitsweep.model.sharing import NoSharing, drop_aliases, fill_aliases, tie_blocks
from vitsweep.model.temporal import FrameAverage
from vitsweep.model.token_pruning import NoTokenPruning


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Cut the image into patch_size x patch_size patches every `stride` pixels (stride below the
    patch size: overlapping patches) and project each to `dim` with one strided convolution.

    With `conv_stem` channel counts (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"),
    3x3 stride-2 convolutions, each followed by BatchNorm and ReLU, halve the image once per entry until one
    pixel of their output stands for one patch; a 1x1 convolution (`proj`) then projects it to `dim`. The
    tokens keep their patch grid; each one also sees a border of its neighbours' pixels."""

    def __init__(self, image_size, patch_size: int, stride: int | None, in_channels: int, dim: int,
                 conv_stem: Sequence[int] = ()):
        super().__init__()
        stride = stride or patch_size
        h, w = _pair(image_size)
        for side, name in ((h, "height"), (w, "width")):
            if side < patch_size or (side - patch_size) % stride != 0:
                hint = (f"use an image size divisible by {patch_size}" if stride == patch_size
                        else f"need (image_size - patch_size) divisible by the stride {stride}")
                raise ValueError(
                    f"model.patch_size={patch_size} (stride {stride}) does not tile image {name} {side}: {hint}"
                )
        conv_stem = [int(c) for c in conv_stem or ()]
        if conv_stem and (2 ** len(conv_stem) != patch_size or stride != patch_size):
            raise ValueError(f"model.conv_stem={conv_stem} halves the image {len(conv_stem)} times, which makes "
                             f"{2 ** len(conv_stem)} px patches, not model.patch_size={patch_size} (stride {stride}): "
                             f"give one channel count per halving, log2(patch_size) of them (e.g. [32, 64] for "
                             f"patch 4), with model.patch_stride=null")
        if any(c < 1 for c in conv_stem):
            raise ValueError(f"model.conv_stem={conv_stem}: channel counts must be at least 1")
        self.image_size = (h, w)
        self.patch_size, self.stride = (patch_size, patch_size), (stride, stride)  # in pixels, stem or not
        self.in_channels, self.conv_stem = in_channels, conv_stem  # conv_stem: [] for the linear embedding
        self.grid_size = ((h - patch_size) // stride + 1, (w - patch_size) // stride + 1)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flattened_patch_dim = patch_size * patch_size * in_channels
        stem, channels = [], in_channels
        for out in conv_stem:
            stem += [nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                     nn.ReLU(inplace=True)]
            channels = out
        self.stem = nn.Sequential(*stem) if stem else nn.Identity()
        kernel = 1 if stem else patch_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=kernel, stride=1 if stem else stride)
        if stem:  # weights in the layout of their gradients (DDP's buckets follow the parameters' strides)
            self.to(memory_format=torch.channels_last)

    def grid(self, x):  # (B, C, H, W) -> (B, dim, gh, gw), for any size the patches tile
        if self.conv_stem:  # oneDNN's convolutions run channels-last: a recipe step 1.17x faster (bench/conv_stem_layout.py)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.stem(x))

    def forward(self, x):  # (B, C, H, W)
        return self.grid(x).flatten(2).transpose(1, 2)  # (B, gh*gw, dim)


def patch_pixels(patch_embed: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """The pixels each patch token stands for, (kernel (h, w), stride (h, w)): this ViT's PatchEmbed says so
    (its `proj` is a 1x1 convolution after a conv stem); timm's (Swin) is the one strided convolution."""
    if isinstance(patch_embed, PatchEmbed):
        return patch_embed.patch_size, patch_embed.stride
    return tuple(patch_embed.proj.kernel_size), tuple(patch_embed.proj.stride)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One encoder layer. Pre-norm (x + f(norm(x)), the ViT default, stable when deep) or
    post-norm (norm(x + f(x)), the original Transformer). `reduce` (model/token_pruning) drops or
    merges tokens between the attention and the MLP, reading the attention's projections."""

    def __init__(self, dim, mlp_dim, attention: Callable[..., nn.Module], norm: Callable[[int], nn.Module],
                 norm_placement: str, dropout: float, drop_path: float, reduce: nn.Module | None = None):
        super().__init__()
        self.pre_norm = norm_placement == "pre"
        self.norm1 = norm(dim)
        self.attn = attention(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reduce = reduce

    def forward(self, x, size=None):
        """x (B, N, C) and `size` (B, N), the patches each token stands for once tokens were merged
        (None: one each) -> the same for the N' <= N tokens that leave the block."""
        attended, qkv = self.attn(self.norm1(x) if self.pre_norm else x, size=size, return_qkv=True)
        x = x + self.drop_path1(attended)
        if not self.pre_norm:
            x = self.norm1(x)
        if self.reduce is not None:
            x, size = self.reduce(x, qkv, size)  # (B, N', C)
        if self.pre_norm:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        else:
            x = self.norm2(x + self.drop_path2(self.mlp(x)))
        return x, size


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size=224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
        patch_stride: int | None = None,
        conv_stem: Sequence[int] = (),
        pooling: str = "cls",
        norm_placement: str = "pre",
        qkv_bias: bool = True,
        attention: Callable[..., nn.Module] | None = None,
        norm: Callable[[int], nn.Module] | None = None,
        pos_embed: Callable[..., nn.Module] | None = None,
        head: Callable[..., TaskHead] | None = None,
        aux_heads: dict[str, Callable[..., TaskHead]] | None = None,
        token_pruning: Callable[..., NoTokenPruning] | None = None,
        sharing: NoSharing | None = None,
        prompt: Callable[..., NoPrompt] | None = None,
        early_exit: Callable[..., NoEarlyExit] | None = None,
        temporal: Callable[..., TrunkOption] | None = None,
        metadata: Callable[..., MetadataInput] | None = None,
        metadata_spec: dict | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling={pooling!r} is not one of: {', '.join(POOLINGS)}")
        if norm_placement not in ("pre", "post"):
            raise ValueError(f"model.norm_placement={norm_placement!r} is not one of: pre, post")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"model.embed_dim={embed_dim} is not divisible by model.num_heads={num_heads}: "
                f"pick num_heads among the divisors of {embed_dim}"
            )
        attention = attention or MultiHeadAttention
        norm = norm or partial(nn.LayerNorm, eps=1e-6)
        pos_embed = pos_embed or LearnedPositionEmbedding
        self.pooling, self.num_classes, self.embed_dim, self.depth = pooling, num_classes, embed_dim, depth
        self.num_cls_tokens = 1 if pooling == "cls" else 0
        # model/metadata (none unless given): built first, since its token counts among the prefix tokens
        self.metadata = (metadata or partial(MetadataInput, fusion="none"))(dim=embed_dim, depth=depth,
                                                                            spec=metadata_spec)
        # model/temporal (none unless given: frames averaged); built before the patch embedding, which takes the
        # bands of every frame of its tubelets (factorised or divided with tubelet_size > 1)
        self.temporal = (temporal or FrameAverage)(dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                                   norm=norm, qkv_bias=qkv_bias, dropout=dropout,
                                                   attention_dropout=attention_dropout)
        self.in_channels = in_channels  # of one frame
        self.patch_embed = PatchEmbed(image_size, patch_size, patch_stride, in_channels * self.temporal.tubelet_size,
                                      embed_dim, conv_stem)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pooling == "cls" else None
        self.pos_embed = pos_embed(self.grid_size, self.num_cls_tokens, embed_dim)  # cls and patches
        self.pos_drop = nn.Dropout(dropout)
        self.prompt = (prompt or NoPrompt)(depth=depth, dim=embed_dim, patch_dim=self.patch_embed.flattened_patch_dim,
                                           start=self.num_cls_tokens)
        # the tokens before the patches, global under every attention pattern: [cls, prompts, metadata]
        self.num_prefix_tokens = self.num_cls_tokens + self.prompt.num_tokens + self.metadata.num_tokens
        self.token_pruning = (token_pruning or NoTokenPruning)(
            depth=depth, num_heads=num_heads, num_prefix_tokens=self.num_prefix_tokens,
            has_cls_token=pooling == "cls")
        drop_path_rates = torch.linspace(0, drop_path, depth).tolist()  # deeper layers drop more
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, mlp_dim,
                attention=partial(attention, num_heads=num_heads, grid_size=self.grid_size,
                                  num_prefix_tokens=self.num_prefix_tokens, layer_idx=i, qkv_bias=qkv_bias,
                                  attn_drop=attention_dropout, proj_drop=dropout),
                norm=norm, norm_placement=norm_placement, dropout=dropout, drop_path=drop_path_rates[i],
                reduce=self.token_pruning.reducer(i),
            )
            for i in range(depth)
        )
        # weight sharing: the layers reuse modules of earlier blocks; state_dict names them once
        self.sharing = sharing or NoSharing()
        self.shared_aliases = tie_blocks(self.blocks, self.sharing)
        if self.shared_aliases:
            self.register_state_dict_post_hook(drop_aliases)
            self.register_load_state_dict_pre_hook(fill_aliases)
        # cls pooling normalizes every token before taking cls; mean pooling normalizes the
        # pooled vector (timm's fc_norm). Either way one module called `norm`.
        self.norm = norm(embed_dim)
        self.head_drop = nn.Dropout(dropout)
        geometry = {"dim": embed_dim, "grid_size": self.grid_size, "image_size": self.patch_embed.image_size,
                    "num_prefix_tokens": self.num_prefix_tokens, "pooling": pooling, "depth": depth}
        if head is not None:  # a task's head (segmentation decoder, multi-task heads)
            self.head = head(**geometry)
        else:
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_heads = nn.ModuleDict({name: make(**geometry) for name, make in (aux_heads or {}).items()})
        # early exit: classifier heads after some blocks; a sample leaves at the first confident one
        self.early_exit = (early_exit or NoEarlyExit)(depth=depth, dim=embed_dim, num_classes=num_classes,
                                                      pooling=pooling, num_prefix_tokens=self.num_prefix_tokens)
        check_compatible(self)  # every part's needs against the others (compat.py), in one line each
        self._init_weights()

    @property
    def options(self) -> tuple[TrunkOption, ...]:
        """The options plugged into the block loop, in the order each hook point calls them (hooks.py)."""
        return (self.prompt, self.temporal, self.metadata, self.early_exit)

    def _init_weights(self):
        # timm's default ViT init: truncated normal Linear weights, zero biases, tiny cls token
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.temporal.init_weights()  # their own, after: TimeSformer's zero temporal projection,
        self.metadata.init_weights()  # FiLM's zeros, late fusion's identity

    def no_weight_decay(self) -> set[str]:
        """Parameter names that weight decay should leave alone (besides norms and biases): the position and
        time embeddings and the cls tokens."""
        candidates = {"cls_token", "pos_embed.weight", "temporal.cls_token", "temporal.time.weight"}
        return candidates & {name for name, _ in self.named_parameters()}  # those this model's options have

    # ------------------------------------------------------------------------------ the trunk

    def embed(self, x: torch.Tensor, run: TrunkPass, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W), of any size the patches tile, -> the first block's input (B, N, D): [cls, the
        options' prefix tokens (prompts, metadata token), patches]; with `visible` (B, n), those patches only."""
        grid = self.patch_embed.grid(x)  # (B, D, gh, gw): the model's grid, or another image size's
        x = grid.flatten(2).transpose(1, 2)  # (B, P, D)
        c = self.num_cls_tokens
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, D)
        x = self.pos_drop(self.pos_embed(x, grid.shape[-2:]))  # resampled to another grid
        if visible is not None:  # MAE: each visible patch keeps the position it was embedded at
            index = visible[..., None].expand(-1, -1, x.shape[-1])  # (B, n, D)
            x = torch.cat([x[:, :c], x[:, c:].gather(1, index)], dim=1)  # (B, c + n, D)
        for option in self.options:
            x = option.position(x, run)  # divided: each frame's time encoding
        prefix = [tokens for option in self.options if (tokens := option.prefix_tokens(x.shape[0], run)) is not None]
        return torch.cat([x[:, :c], *prefix, x[:, c:]], dim=1) if prefix else x  # (B, c + prompts + meta + P, D)

    def forward_features(self, x: torch.Tensor, clip: Clip | None = None, visible: torch.Tensor | None = None,
                         run: TrunkPass | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, D) after the last block (normalized with cls pooling).

        clip     x holds every frame of a time series, (B * T, C, H, W), and the tokens are per frame (clip.py)
        visible  (B, n) the patch indices that go through the blocks (MAE); None: all of them
        run      a TrunkPass to read afterwards (blocks kept, early exits); its clip, when given
        """
        run = run or TrunkPass(clip or Clip())
        x = self.embed(x, run, visible)  # (B, N, D)
        for layer, block in enumerate(self.blocks):
            for option in self.options:
                x = option.before_block(layer, x, run)  # deep prompts; divided: attention across frames
            x, run.size = block(x, run.size)  # (B, N', D): token pruning leaves N' <= N
            for option in self.options:
                x = option.after_block(layer, x, run)  # film; early exit: (B', N', D), B' <= B samples left
            if layer in run.keep_blocks:
                run.hidden[layer] = x
            if x.shape[0] == 0:
                break  # every sample has left at an exit: no further block runs
        if self.pooling == "cls":
            x = self.norm(x)  # every token; mean pooling normalizes the pooled vector (forward_head)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = pool_tokens(x, self.pooling, self.num_prefix_tokens)  # (B, N, D) -> (B, D)
        if self.pooling == "mean":
            x = self.norm(x)  # timm's fc_norm
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def pool(self, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """Every frame's tokens (B * T, N, D) -> each sample's vector (B, D): pooled per frame (forward_head),
        then the options' pooling hooks: over the frames (model/temporal), with the metadata (model/metadata=late)."""
        pooled = self.forward_head(tokens, pre_logits=True)  # (B * T, D)
        for option in self.options:
            pooled = option.pool(pooled, run)  # (B, D) once the frames are pooled
        return pooled

    def read_inputs(self, x) -> tuple[torch.Tensor, Clip]:
        """A batch (images, frames, or Inputs) -> (every frame as an image (B * T, C, H, W), its Clip); with
        tubelets (model.temporal.tubelet_size > 1), every tubelet's frames stacked band-wise."""
        images, inputs = unpack(x)
        frames = inputs.images.shape[1] if inputs.images.dim() == 5 else 1
        return self.temporal.tubelets(images, Clip(frames, inputs.dates, self.metadata.encode(inputs)))

    def forward(self, x):  # (B, C, H, W) | (B, T, C, H, W) | Inputs -> logits (B, num_classes), or the heads' outputs
        if isinstance(self.head, TaskHead) or (self.aux_heads and self.training):
            return self.forward_heads(x)
        images, clip = self.read_inputs(x)
        if any(SINGLE_IMAGES in option.needs for option in self.options):
            clip = Clip()  # early exit: each frame of a series (model/temporal=none) exits as an image of its own
        run = TrunkPass(clip)
        out = self.head(self.pool(self.forward_features(images, run=run), run))  # (B, K)
        for option in self.options:
            out = option.output(out, run)  # early exit: each sample's logits from where it left
        return out

    def forward_heads(self, x):
        """A task's heads on the trunk (heads.py): the main head's output, and in training mode with auxiliary
        heads {"out": it, <aux name>: that head's output}."""
        heads = [self.head, *(self.aux_heads.values() if self.training else [])]
        features = self.features(x, heads)
        out = self.head(features) if isinstance(self.head, TaskHead) else self.head(features.pooled)
        if self.aux_heads and self.training:  # auxiliary outputs are for the training loss only
            return {"out": out, **{name: head(features) for name, head in self.aux_heads.items()}}
        return out

    def features(self, x, heads: list[nn.Module]) -> Features:
        """What `heads` read from the trunk for images x (B, C, H, W): see heads.py. Time series: the pooled
        vector is the sample's (model/temporal); tokens and attention maps are the mean over its frames."""
        depth = len(self.blocks)
        task_heads = [head for head in heads if isinstance(head, TaskHead)]
        keep = {i: i % depth for head in task_heads for i in head.reads_blocks}
        watched = {i: i % depth for head in task_heads for i in head.reads_attention}
        images, clip = self.read_inputs(x)
        run = TrunkPass(clip, keep_blocks=frozenset(keep.values()))
        with contextlib.ExitStack() as stack:
            maps = {b: stack.enter_context(record_attention(self.blocks[b])) for b in set(watched.values())}
            tokens = self.forward_features(images, run=run)
        return Features(pooled=self.pool(tokens, run),
                        patch_tokens=clip.frame_mean(tokens[:, self.num_prefix_tokens:]), grid_size=self.grid_size,
                        image_size=self.patch_embed.image_size, num_prefix_tokens=self.num_prefix_tokens,
                        hidden={i: clip.frame_mean(run.hidden[b]) for i, b in keep.items()},
                        attention={i: clip.frame_mean(maps[b][0]) for i, b in watched.items()})  # (B, nh, N, N) each

    # ------------------------------------------------------------------------------ what callers read

    def last_block_name(self) -> str:
        """The block whose weights the last layer runs (model.trainable=head+norm+last_block); with
        model/sharing, the earlier block it shares them with."""
        return f"blocks.{self.sharing.schedule(self.depth)[-1]}"

    @property
    def keeps_token_grid(self) -> bool:
        """Whether every layer sees every patch token in place (false once tokens are pruned or merged):
        what attention maps on the patch grid, rollout and Grad-CAM need."""
        return self.token_pruning.name == "none"

    def tokens_per_layer(self) -> list[int]:
        """Tokens entering each layer, then leaving the last (prefix tokens included)."""
        return self.token_pruning.tokens_per_layer(self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1])

    def summary(self) -> str:
        num_params = sum(p.numel() for p in self.parameters())
        gh, gw = self.grid_size
        prefix = f"{self.num_cls_tokens} cls" + (f" + {self.prompt.length} prompt" if self.prompt.length else "")
        line = (
            f"VisionTransformer: {num_params / 1e6:.2f}M parameters | grid {gh}x{gw} = {gh * gw} patches "
            f"+ {prefix} | flattened_patch_dim {self.patch_embed.flattened_patch_dim} | "
            f"embed_dim {self.embed_dim} | depth {len(self.blocks)} | pooling {self.pooling} | "
            f"attention {type(self.blocks[0].attn).__name__} | norm {type(self.norm).__name__} | "
            f"pos_embed {type(self.pos_embed).__name__} | temporal {type(self.temporal).__name__} | "
            f"metadata {self.metadata.fusion}"
        )
        if self.prompt.length:
            line += f" | prompt {type(self.prompt).__name__} x{self.prompt.length}"
        if self.sharing.name != "none":
            line += f" | sharing {self.sharing.name}: layers run blocks {self.sharing.schedule(self.depth)}"
        if self.early_exit.name != "none":
            line += (f" | early_exit {self.early_exit.name}: exits after layers {self.early_exit.layers[:-1]}, "
                     f"threshold {self.early_exit.threshold}")
        if self.token_pruning.name != "none":
            line += f" | token_pruning {self.token_pruning.name}: tokens per layer {self.tokens_per_layer()}"
        return line
