"""The from-scratch ViT: shapes, attention maps and bad-shape errors for each model option."""

from functools import partial

import pytest
import torch
from torch import nn

from vitsweep.model import VisionTransformer, record_attention
from vitsweep.model.pos_embed import NoPositionEmbedding, SinCosPositionEmbedding


def tiny(**kw):
    args = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 5, "embed_dim": 32, "depth": 2,
                "num_heads": 4, "mlp_dim": 64}
    return VisionTransformer(**{**args, **kw})


@pytest.mark.parametrize("pooling,prefix", [("cls", 1), ("mean", 0)])
@pytest.mark.parametrize("pos_embed", [None, SinCosPositionEmbedding, NoPositionEmbedding])
def test_logits_and_attention_shapes(pooling, prefix, pos_embed):
    model = tiny(pooling=pooling, pos_embed=pos_embed).eval()
    images = torch.randn(3, 3, 16, 16)
    with record_attention(model) as attentions:
        logits = model(images)
    assert logits.shape == (3, 5)
    assert len(attentions) == 2
    n = prefix + 16
    for attn in attentions:
        assert attn.shape == (3, 4, n, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, n))
    # the visualization path computes the same function as the fast SDPA path
    torch.testing.assert_close(model(images), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_size,channels", [(8, 1), (24, 4), ((16, 32), 13)])
def test_any_image_size_and_channel_count(image_size, channels):
    model = tiny(image_size=image_size, in_channels=channels, patch_size=4)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert model(torch.randn(2, channels, h, w)).shape == (2, 5)
    assert model.grid_size == (h // 4, w // 4)
    assert model.patch_embed.flattened_patch_dim == 4 * 4 * channels


def test_overlapping_patches_give_more_tokens():
    plain, overlapping = tiny(patch_size=4), tiny(patch_size=4, patch_stride=2)
    assert plain.grid_size == (4, 4) and overlapping.grid_size == (7, 7)
    with record_attention(overlapping) as attentions:
        overlapping(torch.randn(1, 3, 16, 16))
    assert attentions[0].shape[-1] == 1 + 49


def test_drop_path_is_stochastic_in_training_only():
    model = tiny(drop_path=0.5)
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    a = model(images)
    torch.manual_seed(1)
    b = model(images)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(images), model(images))


def test_summary_names_patch_dim_and_parameter_count():
    model = tiny(in_channels=6)
    params = sum(p.numel() for p in model.parameters())
    text = model.summary()
    assert f"{params / 1e6:.2f}M parameters" in text
    assert "flattened_patch_dim 96" in text


def test_no_weight_decay_names_exist():
    model = tiny()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


def test_norm_is_injected():
    model = tiny(norm=partial(nn.RMSNorm, eps=1e-6))
    assert isinstance(model.blocks[0].norm1, nn.RMSNorm) and isinstance(model.norm, nn.RMSNorm)


@pytest.mark.parametrize("kwargs,key", [
    ({"image_size": 18, "patch_size": 4}, "model.patch_size=4"),
    ({"embed_dim": 30, "num_heads": 4}, "model.embed_dim=30"),
    ({"pooling": "max"}, "model.pooling='max'"),
    ({"patch_size": 4, "patch_stride": 5}, "model.patch_size=4"),  # (16 - 4) % 5 != 0
])
def test_bad_shapes_fail_with_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        tiny(**kwargs)
