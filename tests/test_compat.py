"""vitsweep/model/compat.py: the one check of which parts combine, for the refusals the trunk reference
(tests/test_trunk_reference.py) does not reach: a pretraining method on an encoder with fine-tuning options,
early exit without class logits, and DINO's needs, which follow its crop size."""

from __future__ import annotations

from functools import partial

import pytest

from vitsweep.model import VisionTransformer
from vitsweep.model.compat import ANY_TOKENS, PLAIN_ENCODER
from vitsweep.model.early_exit import ConfidenceExit
from vitsweep.model.metadata import MetadataInput
from vitsweep.model.prompt import DeepPrompt
from vitsweep.model.temporal import FactorisedEncoder
from vitsweep.model.token_pruning import EViT
from vitsweep.pretrain import DINO, MAE

SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 3, "embed_dim": 16, "depth": 3, "num_heads": 2,
         "mlp_dim": 32}
SPEC = {"numeric": ["a"], "mean": [0.0], "std": [1.0]}


@pytest.mark.parametrize("method", [MAE(decoder_dim=16, decoder_num_heads=2),
                                    DINO(out_dim=16, hidden_dim=16, bottleneck_dim=8, num_local_crops=2)],
                         ids=["mae", "dino"])
def test_pretraining_takes_the_plain_encoder_and_names_every_option_set(method):
    encoder = VisionTransformer(**SHAPE, num_classes=0, prompt=partial(DeepPrompt, length=2),
                                temporal=FactorisedEncoder, metadata=partial(MetadataInput, fusion="film"),
                                metadata_spec=SPEC)
    with pytest.raises(ValueError) as refused:
        method.wrap(encoder)
    assert str(refused.value) == (
        f"pretrain={method.name} pretrains the plain encoder, but model/prompt, model/metadata, model/temporal is set: "
        f"pretrain with model/prompt=none model/metadata=none model/temporal=none, then fine-tune with it")
    with pytest.raises(ValueError, match=rf"pretrain={method.name} .* model/token_pruning is set: pretrain with "
                                         r"model/token_pruning=none, then"):
        method.wrap(VisionTransformer(**SHAPE, num_classes=0, token_pruning=EViT))


def test_early_exit_needs_class_logits_of_the_linear_head():
    with pytest.raises(ValueError) as refused:
        VisionTransformer(**SHAPE, num_classes=1, early_exit=partial(ConfidenceExit, blocks=[0]))
    assert str(refused.value) == ("model/early_exit=confidence needs class logits, but model.num_classes=1: use it "
                                  "with task=classification")
    assert VisionTransformer(**SHAPE, num_classes=2, early_exit=partial(ConfidenceExit, blocks=[0])) is not None


def test_dino_needs_attention_on_any_grid_only_for_crops_of_another_size():
    dino = partial(DINO, out_dim=16, hidden_dim=16, bottleneck_dim=8, num_local_crops=2)
    assert dino(local_crop_size=8).wrap(VisionTransformer(**SHAPE, num_classes=0)).needs == {PLAIN_ENCODER,
                                                                                               ANY_TOKENS}
    assert dino(local_crop_size=16).wrap(VisionTransformer(**SHAPE, num_classes=0)).needs == {PLAIN_ENCODER}
