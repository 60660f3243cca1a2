"""A Vision Transformer from scratch (Dosovitskiy et al., 2020), in the shape of timm's.

Module names follow timm's `VisionTransformer` (patch_embed.proj, cls_token, blocks.i.attn.qkv,
blocks.i.mlp.fc1, norm, head), so timm weights port with little renaming (see pretrained.py).
The attention pattern, the norm layer, the position embedding, token pruning, weight sharing,
prompt tokens and early exit are components injected by the config groups model/attention,
model/norm, model/pos_embed, model/token_pruning, model/sharing, model/prompt and model/early_exit.

The head is timm's `nn.Linear` on the pooled vector unless a task gives a `TaskHead` factory
(`head=`, plus `aux_heads=` trained alongside it; see heads.py): then the trunk hands the head the
`Features` it asks for, and in training mode with auxiliary heads `forward` returns
{"out": main output, <aux name>: aux output, ...} (torchvision's segmentation models do the same).

Image time series and metadata (model/temporal, model/metadata): `forward` also takes frames (B, T, C, H, W)
or an `Inputs` with metadata and dates (vitsweep.data.inputs). Every frame is embedded as an image, the
frames of a sample consecutive in the batch; the `temporal` component mixes frames (inside the blocks, or
over the frames' pooled vectors) and the `metadata` component adds a token, modulates the blocks or joins
the pooled vector (vitsweep.model.clip carries what they need). With the defaults (`none`) and images the
model is the plain ViT.

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
from vitsweep.model.early_exit import NoEarlyExit
from vitsweep.model.heads import Features, TaskHead
from vitsweep.model.metadata import MetadataInput
from vitsweep.model.pos_embed import LearnedPositionEmbedding
from vitsweep.model.prompt import NoPrompt
from vitsweep.model.sharing import NoSharing, drop_aliases, fill_aliases, tie_blocks
from vitsweep.model.temporal import DividedSpaceTime, FrameAverage
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
        prompt: Callable[..., nn.Module] | None = None,
        early_exit: Callable[..., NoEarlyExit] | None = None,
        temporal: Callable[..., nn.Module] | None = None,
        metadata: Callable[..., MetadataInput] | None = None,
        metadata_spec: dict | None = None,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"model.pooling={pooling!r} is not one of: cls, mean")
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
        self.prompt = (prompt or NoPrompt)(depth=depth, dim=embed_dim, patch_dim=self.patch_embed.flattened_patch_dim)
        # the tokens before the patches, global under every attention pattern: [cls, prompts, metadata]
        self.num_prefix_tokens = self.num_cls_tokens + self.prompt.length + self.metadata.num_tokens
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
        if self.token_pruning.name != "none" and not self.blocks[0].attn.supports_token_reduction:
            raise ValueError(
                f"model/token_pruning={self.token_pruning.name} cannot run with {type(self.blocks[0].attn).__name__}: "
                "its pattern needs the whole patch grid in every layer; use model/attention=full")
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
        grid_readers = [name for name, h in [("task head", self.head), *self.aux_heads.items()]
                        if getattr(h, "reads_patch_grid", False)]
        if grid_readers and not self.keeps_token_grid:
            raise ValueError(f"model/token_pruning={self.token_pruning.name} drops or merges patch tokens, but the "
                             f"{', '.join(grid_readers)} reads them on the patch grid (segmentation, patch labels, "
                             f"attention maps): use model/token_pruning=none with this task")
        # early exit: classifier heads after some blocks; a sample leaves at the first confident one
        self.early_exit = (early_exit or NoEarlyExit)(depth=depth, dim=embed_dim, num_classes=num_classes,
                                                      pooling=pooling, num_prefix_tokens=self.num_prefix_tokens)
        if self.early_exit.name != "none" and (head is not None or self.aux_heads):
            raise ValueError(f"model/early_exit={self.early_exit.name} exits with class logits of the linear head, "
                             f"but this run's task gives its own heads (segmentation, multi-task or "
                             f"task.aux_heads): use model/early_exit=none with it")
        if self.token_pruning.name != "none" and isinstance(self.temporal, DividedSpaceTime):
            raise ValueError(f"model/token_pruning={self.token_pruning.name} prunes each frame's tokens apart, but "
                             f"model/temporal=divided attends across frames token by token: use "
                             f"model/temporal=factorised with token pruning")
        if self.early_exit.name != "none" and (not isinstance(self.temporal, FrameAverage)
                                               or self.metadata.fusion != "none"):
            raise ValueError(f"model/early_exit={self.early_exit.name} exits from single images: use "
                             f"model/temporal=none and model/metadata=none with it")
        self._init_weights()

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

    def embed_tokens(self, x, clip: Clip | None = None):
        """Images (B, C, H, W), or every frame of a clip (B * T, C, H, W) -> the first block's input (B, N, D):
        [cls, prompts, metadata token, patches] (prompts with model/prompt, the token with model/metadata=token)."""
        clip = clip or Clip()  # images: the temporal and metadata steps below change nothing
        x = self.patch_embed(x)  # (B, P, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+P, D)
        x = self.pos_drop(self.pos_embed(x))
        x = self.temporal.embed(x, clip)  # divided: each frame's time encoding
        x = self.prompt.insert(x, after=self.num_cls_tokens)  # (B, p + P, D): [cls, prompts, patches]
        return self.metadata.prefix(x, clip, after=self.num_cls_tokens + self.prompt.length)  # token: one more

    def forward_features(self, x, keep_blocks: frozenset[int] = frozenset(), clip: Clip | None = None):
        """Tokens (B, N, D) after the last block (normalized with cls pooling); with `keep_blocks`, also
        {i: block i's output tokens} for those blocks. With a `clip` (time series, metadata), x holds every
        frame of every sample, (B * T, C, H, W), and the tokens are per frame (vitsweep.model.clip)."""
        clip = clip or Clip()
        x = self.embed_tokens(x, clip)
        size = None  # (B, N) patches per token, once token merging (ToMe) has merged some
        hidden = {}
        for layer, block in enumerate(self.blocks):
            x = self.prompt.at_layer(x, layer, after=self.num_cls_tokens)  # deep prompts: this layer's own
            x = self.temporal.mix(layer, x, clip)  # divided: each token attends across its sample's frames
            x, size = block(x, size)  # (B, N', D)
            x = self.metadata.modulate(layer, x, clip)  # film
            if layer in keep_blocks:
                hidden[layer] = x
        if self.pooling == "cls":
            x = self.norm(x)
        return (x, hidden) if keep_blocks else x

    def forward_head(self, x, pre_logits: bool = False):
        if self.pooling == "cls":
            x = x[:, 0]  # (B, D)
        else:
            x = self.norm(x[:, self.num_prefix_tokens:].mean(dim=1))  # (B, D)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def read_inputs(self, x) -> tuple[torch.Tensor, Clip]:
        """A batch (images, frames, or Inputs) -> (every frame as an image (B * T, C, H, W), its Clip); with
        tubelets (model.temporal.tubelet_size > 1), every tubelet's frames stacked band-wise."""
        images, inputs = unpack(x)
        frames = inputs.images.shape[1] if inputs.images.dim() == 5 else 1
        return self.temporal.tubelets(images, Clip(frames, inputs.dates, self.metadata.encode(inputs)))

    def pool(self, tokens: torch.Tensor, clip: Clip) -> torch.Tensor:
        """Every frame's tokens (B * T, N, D) -> each sample's vector (B, D): pooled per frame (forward_head),
        over the frames (model/temporal), then joined with the metadata (model/metadata=late)."""
        pooled = self.forward_head(tokens, pre_logits=True)  # (B * T, D)
        return self.metadata.fuse(self.temporal.pool(pooled, clip), clip)  # (B, D)

    def forward(self, x):  # (B, C, H, W) | (B, T, C, H, W) | Inputs -> logits (B, num_classes), or the heads' outputs
        if self.early_exit.name != "none":
            return self.forward_early_exit(x)
        if not isinstance(self.head, TaskHead) and not (self.aux_heads and self.training):
            images, clip = self.read_inputs(x)
            return self.head(self.pool(self.forward_features(images, clip=clip), clip))
        heads = [self.head, *(self.aux_heads.values() if self.training else [])]
        features = self.features(x, heads)
        out = self.head(features) if isinstance(self.head, TaskHead) else self.head(features.pooled)
        if self.aux_heads and self.training:  # auxiliary outputs are for the training loss only
            return {"out": out, **{name: head(features) for name, head in self.aux_heads.items()}}
        return out

    def forward_early_exit(self, x):
        """model/early_exit (see early_exit.py): in training {"out": final logits (B, K), "early_exits": every
        exit's (E, B, K)}; at eval each sample's first confident exit's logits (B, K), a sample leaving the
        batch at its exit, so the blocks after it run on the samples still left only."""
        exits = self.early_exit
        # samples drop out as they leave: at eval, unless record_exits wants every exit (or on the meta
        # device, the FLOP count: no values to decide on, the whole depth, the worst case)
        images, _ = self.read_inputs(x)  # (B, C, H, W): early exit takes single images (refused otherwise)
        drop_out = not self.training and exits.recorder is None and not images.is_meta
        x, size = self.embed_tokens(images), None
        running = torch.arange(x.shape[0], device=x.device)  # (R,) the samples still in the blocks
        out = None  # (B, K) each sample's logits from where it left (drop_out only)
        exit_logits = []  # (B, K) of each exit (training, recording)
        for layer, block in enumerate(self.blocks):
            x = self.prompt.at_layer(x, layer, after=self.num_cls_tokens)
            x, size = block(x, size)  # (R, N', D)
            if layer not in exits.blocks:
                continue
            logits = exits.head(layer, x)  # (R, K)
            if not drop_out:
                exit_logits.append(logits)
                continue
            if out is None:
                out = logits.new_empty(len(running), logits.shape[1])
            leaving = exits.confidence(logits) > exits.threshold  # (R,)
            if leaving.any():
                out[running[leaving]] = logits[leaving]
                staying = ~leaving
                running, x = running[staying], x[staying]  # (R', ...)
                size = None if size is None else size[staying]
                if len(running) == 0:
                    return out  # everyone has left: no further block runs
        if self.pooling == "cls":
            x = self.norm(x)
        final_logits = self.forward_head(x)  # (R, K)
        if drop_out:
            out[running] = final_logits  # the final head takes whoever is left
            return out
        return exits.decide(exit_logits, final_logits)

    def features(self, x, heads: list[nn.Module]) -> Features:
        """What `heads` read from the trunk for images x (B, C, H, W): see heads.py. Time series: the pooled
        vector is the sample's (model/temporal); tokens and attention maps are the mean over its frames."""
        depth = len(self.blocks)
        task_heads = [head for head in heads if isinstance(head, TaskHead)]
        keep = {i: i % depth for head in task_heads for i in head.reads_blocks}
        watched = {i: i % depth for head in task_heads for i in head.reads_attention}
        images, clip = self.read_inputs(x)
        with contextlib.ExitStack() as stack:
            maps = {b: stack.enter_context(record_attention(self.blocks[b])) for b in set(watched.values())}
            out = self.forward_features(images, frozenset(keep.values()), clip)
        tokens, hidden = out if keep else (out, {})
        return Features(pooled=self.pool(tokens, clip),
                        patch_tokens=clip.frame_mean(tokens[:, self.num_prefix_tokens:]), grid_size=self.grid_size,
                        image_size=self.patch_embed.image_size, num_prefix_tokens=self.num_prefix_tokens,
                        hidden={i: clip.frame_mean(hidden[b]) for i, b in keep.items()},
                        attention={i: clip.frame_mean(maps[b][0]) for i, b in watched.items()})  # (B, nh, N, N) each

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
