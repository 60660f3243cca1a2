"""Which parts of a ViT combine: each part declares what it needs of the trunk (`needs`, the names below), and
`check_compatible` refuses, at build time and in one line naming the option and the fix, a part whose need
another part takes away. Every such rule is here.

    need            declared by                                   taken away by
    ANY_TOKENS      model/token_pruning (fewer tokens each        model/attention=local|windowed|sparse: their
                    layer), pretrain=mae (the visible patches),   patterns are masks over the model's whole
                    pretrain=dino (local crops of another size)   patch grid
    PATCH_GRID      task heads that read the patch grid           model/token_pruning (drops or merges patch
                    (`TaskHead.reads_patch_grid`), model/         tokens)
                    temporal=divided (token i of every frame)
    CLASS_LOGITS    model/early_exit (exits with the linear       a task's own heads (segmentation, multi-task,
                    head's class logits)                          task.aux_heads); model.num_classes < 2
    SINGLE_IMAGES   model/early_exit (a sample leaves alone)      model/temporal, model/metadata
    PLAIN_ENCODER   pretrain=mae, pretrain=dino                   model/token_pruning, prompt, early_exit,
                                                                  metadata, temporal (for the fine-tuning run)
    OWN_WEIGHTS     model.pretrained (every layer its weights)    model/sharing (layers share one set)

Called by the trunk's constructor once every part is built (`VisionTransformer.__init__`), by the factory with
the weights it will load (`create_vit`), and by a pretraining method with its own needs (pretrain/mae.py,
pretrain/dino.py). A cls token (EViT, ToMe, the attention aux head) is not checked here: those parts are
given the trunk's pooling when built, and refuse then (before the task's heads are built).
"""

from __future__ import annotations

from torch import nn

from vitsweep.model.heads import TaskHead

ANY_TOKENS = "any_tokens"  # attention that runs on any set of patch tokens, not only the model's whole grid
PATCH_GRID = "patch_grid"  # every patch token in place through every layer
CLASS_LOGITS = "class_logits"  # class logits from the trunk's linear head
SINGLE_IMAGES = "single_images"  # one image per sample: no frames to mix, no metadata to fuse
PLAIN_ENCODER = "plain_encoder"  # none of the options that change the token sequence, the inputs or the heads
OWN_WEIGHTS = "own_weights"  # every layer its own weights

# the options a plain encoder leaves at none, in the order a refusal names them
ENCODER_OPTIONS = ("token_pruning", "prompt", "early_exit", "metadata", "temporal")


def check_compatible(model: nn.Module, method: nn.Module | None = None, pretrained: str | None = None) -> None:
    """Raise ValueError (one line) when a part of `model` (a VisionTransformer), the `pretrained` weights it is
    to start from, or the pretraining `method` to train it (its `kind`, `needs`, and DINO's local_crop_size)
    needs what another part takes away (the module docstring's table)."""
    pruning, early_exit = model.token_pruning, model.early_exit
    attention = type(model.blocks[0].attn).__name__
    any_tokens = all(getattr(block.attn, "supports_token_reduction", False) for block in model.blocks)
    patch_grid = pruning.name == "none"

    if ANY_TOKENS in pruning.needs and not any_tokens:
        raise ValueError(f"model/token_pruning={pruning.name} cannot run with {attention}: its pattern needs the whole "
                         f"patch grid in every layer; use model/attention=full")
    heads = [("task head", model.head), *model.aux_heads.items()]
    grid_readers = [name for name, head in heads if getattr(head, "reads_patch_grid", False)]  # PATCH_GRID
    if grid_readers and not patch_grid:
        raise ValueError(f"model/token_pruning={pruning.name} drops or merges patch tokens, but the "
                         f"{', '.join(grid_readers)} reads them on the patch grid (segmentation, patch labels, "
                         f"attention maps): use model/token_pruning=none with this task")
    if CLASS_LOGITS in early_exit.needs:
        if model.num_classes < 2:
            raise ValueError(f"model/early_exit={early_exit.name} needs class logits, but model.num_classes="
                             f"{model.num_classes}: use it with task=classification")
        if isinstance(model.head, TaskHead) or model.aux_heads:
            raise ValueError(f"model/early_exit={early_exit.name} exits with class logits of the linear head, but "
                             f"this run's task gives its own heads (segmentation, multi-task or task.aux_heads): use "
                             f"model/early_exit=none with it")
    if PATCH_GRID in model.temporal.needs and not patch_grid:
        raise ValueError(f"model/token_pruning={pruning.name} prunes each frame's tokens apart, but "
                         f"model/temporal={model.temporal.name} attends across frames token by token: use "
                         f"model/temporal=factorised with token pruning")
    if SINGLE_IMAGES in early_exit.needs and (model.temporal.name != "none" or model.metadata.name != "none"):
        raise ValueError(f"model/early_exit={early_exit.name} exits from single images: use model/temporal=none and "
                         f"model/metadata=none with it")

    if pretrained and model.sharing.name != "none":  # OWN_WEIGHTS
        raise ValueError(f"model.pretrained={pretrained} cannot start model/sharing={model.sharing.name}: pretrained "
                         f"layers have distinct weights, shared layers one set; train it from scratch "
                         f"(model.pretrained=null)")

    if method is None:
        return
    if PLAIN_ENCODER in method.needs:
        used = [f"model/{group}" for group in ENCODER_OPTIONS if getattr(model, group).name != "none"]
        if used:
            raise ValueError(f"pretrain={method.name} pretrains the plain encoder, but {', '.join(used)} is set: "
                             f"pretrain with {' '.join(f'{group}=none' for group in used)}, then fine-tune with it")
    if ANY_TOKENS in method.needs and not any_tokens:
        if method.name == "mae":
            raise ValueError(f"pretrain=mae runs the encoder on the visible patches only, which the {attention} "
                             f"pattern (a mask over the whole grid) cannot do: pretrain with model/attention=full")
        raise ValueError(f"pretrain.local_crop_size={method.local_crop_size} gives another patch grid than the "
                         f"model's, which the {attention} pattern (a mask over that grid) cannot take: set "
                         f"pretrain.local_crop_size={model.patch_embed.image_size[0]} or model/attention=full")
