"""The figures a run writes about its model: for a few images, what each head of one layer attends
to and the attention rollout (`visualize_attention`, one PNG per image), and why it decides (the
`explain` methods, one PNG for all of them). Used at the end of training and by mode=visualize.

The config group `viz` builds a `FigureReport`; a bad option fails when it is built, before any
training starts.

Models without a flat ViT token sequence (model=swin; a ViT whose tokens are pruned or merged,
model/token_pruning) get no per-head attention figures, and refuse the methods that read that
sequence (rollout, Grad-CAM on the patch grid) with one line; `explain: auto` picks what applies.

A model that reads time series or metadata (model/temporal, model/metadata) gets `frames.png` instead:
attention over each sample's frames (vitsweep.viz.frames); the per-image figures and captum's explanations
take single images without metadata.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vitsweep.data.inputs import Inputs, map_batch
from vitsweep.data.splits import map_targets
from vitsweep.viz.attention import collect_attentions, eval_mode
from vitsweep.viz.explain import EXPLAINERS, NEEDS_TOKEN_GRID
from vitsweep.viz.figures import (
    explanation_figure,
    prediction_title,
    save_figure,
    visualize_attention,
)
from vitsweep.viz.frames import frame_attention, frames_figure

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# viz.explain=auto: these where the model keeps its token grid, else the methods that need none
AUTO_EXPLAIN = ("rollout", "ig", "gradcam")
AUTO_EXPLAIN_WITHOUT_TOKEN_GRID = ("ig",)


def keeps_token_grid(model) -> bool:
    """Whether every layer of `model` sees every patch token in place (a plain ViT)."""
    return getattr(model, "keeps_token_grid", True)


def without_token_grid(model) -> str:
    """Why `model` has no flat token sequence, for messages."""
    pruning = getattr(model, "token_pruning", None)
    if pruning is not None and pruning.name != "none":
        return f"model/token_pruning={pruning.name} prunes or merges tokens between layers"
    return f"{type(model).__name__} merges patches between stages (no flat token sequence)"


class FigureReport:
    def __init__(self, enabled_at_end: bool = True, num_images: int = 4, split: str = "val",
                 images: Sequence[str] | None = None, layer: int = -1, rgb_bands: Sequence[int] | None = None,
                 explain: Sequence[str] | str = "auto"):
        if explain == "auto":
            explain = None  # chosen per model: see methods_for
        elif isinstance(explain, str):
            explain = [explain]
        unknown = [name for name in explain or [] if name not in EXPLAINERS]
        if unknown:
            raise ValueError(f"viz.explain={list(explain)}: unknown method(s) {', '.join(map(str, unknown))}; "
                             f"pick from {', '.join(EXPLAINERS)} (e.g. viz.explain=[rollout,ig,gradcam])")
        if split not in SPLITS:
            raise ValueError(f"viz.split={split!r} is not one of: {', '.join(SPLITS)}")
        if num_images < 1:
            raise ValueError(f"viz.num_images={num_images} must be >= 1 (viz.enabled_at_end=false skips the figures)")
        if rgb_bands is not None and len(rgb_bands) != 3:
            raise ValueError(f"viz.rgb_bands={list(rgb_bands)} must be 3 band indices [r, g, b], or null")
        self.enabled_at_end, self.num_images, self.split = enabled_at_end, num_images, split
        self.image_paths = [str(path) for path in images] if images else None
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"viz.layer={layer} must be a layer index (e.g. -1 for the last)")  # noqa: TRY004 -- bad input: one line
        self.layer, self.explain = layer, None if explain is None else list(explain)
        self.rgb_bands = list(rgb_bands) if rgb_bands is not None else None

    def methods_for(self, model) -> list[str]:
        """The explanation methods drawn for `model`: viz.explain, or for `auto` the default set that
        applies to it."""
        if self.explain is not None:
            return self.explain
        return list(AUTO_EXPLAIN if keeps_token_grid(model) else AUTO_EXPLAIN_WITHOUT_TOKEN_GRID)

    def check(self, model) -> None:
        """Fail now, not after training, when an option does not fit the model: the layer, the
        methods, the bands, image files for a model that takes other than 1 or 3 bands, a missing file."""
        in_channels = model.in_channels  # of one image (or frame)
        if keeps_token_grid(model):
            depth = len(model.blocks)
            if not -depth <= self.layer < depth:
                raise ValueError(f"viz.layer={self.layer} is out of range for a {depth}-layer model: "
                                 f"pick one in {-depth}..{depth - 1}")
        else:
            refused = [name for name in self.methods_for(model) if name in NEEDS_TOKEN_GRID]
            if refused:
                usable = ", ".join(name for name in EXPLAINERS if name not in NEEDS_TOKEN_GRID)
                verb = "needs" if len(refused) == 1 else "need"
                raise ValueError(f"viz.explain={self.explain}: {', '.join(refused)} {verb} every patch token in "
                                 f"every layer, but {without_token_grid(model)}: pick from {usable}, or "
                                 f"viz.explain=auto, or viz.enabled_at_end=false")
        if self.rgb_bands is not None and not all(0 <= band < in_channels for band in self.rgb_bands):
            raise ValueError(f"viz.rgb_bands={self.rgb_bands} must be band indices in 0..{in_channels - 1}")
        for path in self.image_paths or []:
            image_file(path, in_channels)

    # ------------------------------------------------------------------------------- the images

    def inputs(self, data, image_size) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """The normalized model inputs (B, C, H, W) on the data's device, their labels (None for
        image files) and a short name for each: `viz.images` when set, else the first `num_images`
        of `viz.split`, through the data's own eval path (conversion, resizing)."""
        if self.image_paths:
            images = torch.stack([read_image_file(path, data.in_channels, image_size) for path in self.image_paths])
            names = [re.sub(r"[^\w-]", "_", Path(path).stem)[:40] for path in self.image_paths]
            return data.normalize(images.to(data.device)), None, names
        images, labels = next(iter(data.eval_batches(self.split)))  # a fixed set: the split's first images
        images = map_batch(lambda t: t[::data.eval_views], images)  # data.eval_crop=tiled: each image's first window
        images = map_batch(lambda t: t[:self.num_images], images)  # (with their metadata and dates, if any)
        labels = map_targets(lambda t: t[:self.num_images], labels)
        return data.normalize(images), labels, [f"{self.split}{i}" for i in range(images.shape[0])]

    # ------------------------------------------------------------------------------ the figures

    def write(self, model, images: torch.Tensor, labels: torch.Tensor | None, class_names: Sequence[str] | None,
              out_dir: Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              names: Sequence[str] | None = None) -> dict[str, Path]:
        """Write `attention_<i>_<name>.png` per image and `explanations.png` for the batch under
        `out_dir`; returns {logger key: PNG path}. `images` are normalized model inputs; `mean`/`std`
        undo that normalization for display."""
        self.check(model)
        out_dir = Path(out_dir)
        class_names = list(class_names) if class_names else None
        if labels is not None and labels.dim() != 1:
            labels = None  # multi-hot labels: the titles show the prediction only
        names = list(names) if names is not None else [str(i) for i in range(images.shape[0])]
        style = {"rgb_bands": self.rgb_bands, "mean": mean, "std": std}
        figures = {}
        if not keeps_token_grid(model):
            log.info("figures: no per-head attention maps: %s", without_token_grid(model))
            names = []
        for i, name in enumerate(names):
            label = None if labels is None else int(labels[i])
            figure = visualize_attention(model, images[i], label=label, class_names=class_names, layer=self.layer,
                                         **style)
            figures[f"viz/attention_{i:02d}"] = save_figure(figure, out_dir / f"attention_{i:02d}_{name}.png")
        methods = self.methods_for(model)
        if methods:
            figure = explanation_figure(model, images, methods=methods, labels=labels, class_names=class_names,
                                        **style)
            figures["viz/explanations"] = save_figure(figure, out_dir / "explanations.png")
        return figures

    def write_for(self, model, data, image_size, out_dir: Path, task=None) -> dict[str, Path]:
        """`inputs` then the figures of `model` for this report's images of `data`: with a task (the
        protocol of vitsweep/task/protocol.py), titled with its predictions and truth, its explanations and
        its own figures (`write_task`); without one, as a classifier's (`write`)."""
        images, labels, names = self.inputs(data, image_size)
        mean, std = data.mean.flatten().tolist(), data.std.flatten().tolist()
        class_names = data.class_names()
        if isinstance(images, Inputs) and images.images.dim() == 4 and model.metadata.fusion == "none":
            images = images.images  # an image model: the metadata the data carries is not its input
        if isinstance(images, Inputs) or images.dim() == 5:  # time series, or metadata the model reads
            return self.write_frames(model, task, images, labels, class_names, Path(out_dir), mean, std)
        if task is None:
            return self.write(model, images, labels, class_names, out_dir, mean=mean, std=std, names=names)
        return self.write_task(model, task, images, labels, class_names, Path(out_dir), mean, std, names)

    def write_task(self, model, task, images, labels, class_names, out_dir: Path, mean, std,
                   names) -> dict[str, Path]:
        """Attention figures titled with the task's prediction and truth (`task.title`); explanations of what
        the task says its output means (`task.explains`: the predicted class, output 0, or rollout only for
        outputs that are not one number per image); the task's own figures of these images
        (`task.sample_figures`: segmentation's masks, the auxiliary attention head's maps)."""
        self.check(model)
        style = {"rgb_bands": self.rgb_bands, "mean": mean, "std": std}
        grid = keeps_token_grid(model)
        if grid:
            outputs, _ = collect_attentions(model, images)
        else:  # pruned or merged tokens: no per-head maps on the patch grid
            log.info("figures: no per-head attention maps: %s", without_token_grid(model))
            with eval_mode(model), torch.no_grad():
                outputs = model(images)
        titles = [task.title(map_targets(lambda t, i=i: t[i], outputs),
                             None if labels is None else map_targets(lambda t, i=i: t[i], labels), class_names)
                  for i in range(images.shape[0])]
        figures = {}
        for i, name in enumerate(names if grid else []):
            figure = visualize_attention(model, images[i], layer=self.layer, title=titles[i], **style)
            figures[f"viz/attention_{i:02d}"] = save_figure(figure, out_dir / f"attention_{i:02d}_{name}.png")
        wanted = self.methods_for(model)
        methods = wanted if task.explains else [m for m in wanted if m == "rollout"]
        if methods != wanted:
            log.info("viz.explain: %s explain one number per image; task=%s has more: drawing rollout only",
                     ", ".join(m for m in wanted if m != "rollout"), task.name)
        if methods:
            targets = [0] * images.shape[0] if task.explains == "output" else None  # None: the predicted class
            figure = explanation_figure(model, images, methods=methods, targets=targets, titles=titles, **style)
            figures["viz/explanations"] = save_figure(figure, out_dir / "explanations.png")
        for key, figure in task.sample_figures(model, images, outputs, labels, titles, style).items():
            figures[f"viz/{key}"] = save_figure(figure, out_dir / f"{key}.png")
        return figures

    def write_frames(self, model, task, batch, labels, class_names, out_dir: Path, mean, std) -> dict[str, Path]:
        """`frames.png`: each sample's frames with their attention maps and the weights over frames, titled
        with the task's prediction and truth."""
        self.check(model)
        outputs, maps, weights = frame_attention(model, batch, self.layer)

        def title(i):
            output = map_targets(lambda t: t[i], outputs)
            target = None if labels is None else map_targets(lambda t: t[i], labels)
            if task is None:
                return prediction_title(output, None if target is None else int(target), class_names)
            return task.title(output, target, class_names)

        figure = frames_figure(batch, maps, weights, [title(i) for i in range(maps.shape[0])],
                               rgb_bands=self.rgb_bands, mean=mean, std=std)
        log.info("viz: attention over frames in frames.png (per-image attention and explanations: image models)")
        return {"viz/frames": save_figure(figure, out_dir / "frames.png")}


def image_file(path: str, in_channels: int) -> Path:
    """The absolute path of a `viz.images` entry (relative ones are the user's, whatever the job
    dir), checked to exist and to be decodable to `in_channels` bands."""
    from hydra.utils import to_absolute_path

    if in_channels not in (1, 3):
        raise ValueError(f"viz.images: image files give 1 or 3 channels but data.in_channels={in_channels}: "
                         f"drop viz.images to show the first viz.num_images of viz.split instead")
    file = Path(to_absolute_path(str(Path(path).expanduser())))
    if not file.is_file():
        raise FileNotFoundError(f"viz.images: no such file {path} ({file}): pass paths of image files")
    return file


def read_image_file(path: str, in_channels: int, image_size) -> torch.Tensor:
    """One image file (PNG, JPEG, ...) as float (C, H, W) in [0, 1], with the data's channel count
    (1: grey, 3: RGB) and resized (bilinear, antialiased) to the model's `image_size` (int or [h, w])."""
    from torchvision.io import ImageReadMode, decode_image

    file = image_file(path, in_channels)
    try:
        image = decode_image(str(file), mode=ImageReadMode.GRAY if in_channels == 1 else ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"viz.images: {path} is not a readable image ({err}): pass PNG or JPEG files") from None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    resized = F.interpolate(image[None].float().div(255), size=size, mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0].clamp(0, 1)  # (C, H, W)
