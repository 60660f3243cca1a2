"""The model/* options change what the network computes: attention patterns restrict which tokens a
token depends on, norms normalize different axes, placement and position embeddings change the
function, pooling removes the cls token, and any image size, patch size and band count works."""

from functools import partial

import pytest
import torch
from torch import nn

from vitsweep.model import VisionTransformer
from vitsweep.model.attention import (
    LocalAttention,
    MultiHeadAttention,
    SparseAttention,
    WindowedAttention,
    record_attention,
)
from vitsweep.model.norm import TokenBatchNorm
from vitsweep.model.pos_embed import NoPositionEmbedding, SinCosPositionEmbedding

GRID = (4, 5)  # non-square, so rows and columns are not interchangeable
DIM, HEADS = 8, 2

# each pattern as the test derives it from grid coordinates (independently of attention.py):
# may patch (r1, c1) at flat index i see patch (r2, c2) at flat index j?
PATTERNS = {
    "full": (MultiHeadAttention, {}, lambda r1, c1, r2, c2, i, j, layer: True),
    "local3": (LocalAttention, {"kernel_size": 3},
               lambda r1, c1, r2, c2, i, j, layer: abs(r1 - r2) <= 1 and abs(c1 - c2) <= 1),
    "windowed2_noshift": (WindowedAttention, {"window_size": 2, "shift": False},
                          lambda r1, c1, r2, c2, i, j, layer: (r1 // 2, c1 // 2) == (r2 // 2, c2 // 2)),
    # Swin shift by 1 on odd layers: borders at 1, 3, 5, ... (row 0 is a region of its own)
    "windowed2_shift": (WindowedAttention, {"window_size": 2, "shift": True},
                        lambda r1, c1, r2, c2, i, j, layer: (
                            ((r1 + layer) // 2, (c1 + layer) // 2) == ((r2 + layer) // 2, (c2 + layer) // 2))),
    "axial": (SparseAttention, {"pattern": "axial"}, lambda r1, c1, r2, c2, i, j, layer: r1 == r2 or c1 == c2),
    "strided3": (SparseAttention, {"pattern": "strided", "stride": 3},
                 lambda r1, c1, r2, c2, i, j, layer: abs(i - j) < 3 or i % 3 == j % 3),
}


def expected_visibility(name: str, layer: int, num_prefix: int) -> torch.Tensor:
    """(N, N) bool: token i may depend on token j; prefix tokens see and are seen by all."""
    rule = PATTERNS[name][2]
    gh, gw = GRID
    n = num_prefix + gh * gw
    visible = torch.ones(n, n, dtype=torch.bool)
    for i in range(gh * gw):
        for j in range(gh * gw):
            visible[num_prefix + i, num_prefix + j] = rule(i // gw, i % gw, j // gw, j % gw, i, j, layer)
    return visible


def dependence(fn, x: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: output token i has a nonzero gradient w.r.t. input token j (x is (1, N, C)).
    A random projection of each output token stands in for its C channels (one backward pass per
    token, not per channel); a plain sum would be blind after a LayerNorm, whose outputs sum to 0."""
    x = x.clone().requires_grad_(True)
    out = fn(x)  # (1, N, C)
    probe = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    rows = [torch.autograd.grad((out[0, i] * probe).sum(), x, retain_graph=True)[0][0].abs().sum(dim=-1) > 0
            for i in range(out.shape[1])]
    return torch.stack(rows)  # (N, N)


def attention_module(name: str, layer: int = 0, num_prefix: int = 1) -> nn.Module:
    cls, kwargs, _ = PATTERNS[name]
    torch.manual_seed(0)
    return cls(DIM, num_heads=HEADS, grid_size=GRID, num_prefix_tokens=num_prefix, layer_idx=layer, **kwargs)


def tiny_vit(attention=None, norm=None, pos_embed=None, pooling="cls", norm_placement="pre", depth=2, **kwargs):
    torch.manual_seed(0)
    options = {"image_size": (16, 20), "patch_size": 4, "in_channels": 3, "num_classes": 3, "embed_dim": DIM,
               "depth": depth, "num_heads": HEADS, "mlp_dim": 16, "drop_path": 0.0, **kwargs}
    return VisionTransformer(**options, attention=attention, norm=norm, pos_embed=pos_embed,
                             pooling=pooling, norm_placement=norm_placement)


def partial_attention(name: str):
    cls, kwargs, _ = PATTERNS[name]
    return partial(cls, **kwargs)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("num_prefix", [1, 0])
def test_attention_output_depends_only_on_tokens_in_the_pattern(name, layer, num_prefix):
    attn = attention_module(name, layer, num_prefix)
    x = torch.randn(1, num_prefix + GRID[0] * GRID[1], DIM)
    depends = dependence(lambda t: attn(t), x)
    expected = expected_visibility(name, layer, num_prefix)
    # zero gradient outside the pattern, nonzero inside; the cls token (if any) sees and is seen by all
    assert torch.equal(depends, expected)
    if num_prefix:
        assert depends[0].all() and depends[:, 0].all()


@pytest.mark.parametrize("name", ["local3", "windowed2_shift", "axial", "strided3"])
@pytest.mark.parametrize("norm", [partial(nn.LayerNorm, eps=1e-6), partial(nn.RMSNorm, eps=1e-6), TokenBatchNorm])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_block_output_depends_only_on_tokens_in_the_pattern(name, norm, placement):
    model = tiny_vit(attention=partial_attention(name), norm=norm, norm_placement=placement).eval()
    # eval: batchnorm uses running statistics, a per-token affine map (in training its batch
    # statistics are shared by all tokens, so no norm-free locality holds there)
    x = torch.randn(1, 1 + GRID[0] * GRID[1], DIM)
    for layer, block in enumerate(model.blocks):
        depends = dependence(lambda t, block=block: block(t)[0], x)  # blocks return (tokens, token sizes)
        assert torch.equal(depends, expected_visibility(name, layer, num_prefix=1))


def test_shifted_windows_differ_between_even_and_odd_layers():
    model = tiny_vit(attention=partial(WindowedAttention, window_size=2, shift=True), depth=3)
    masks = [block.attn.mask for block in model.blocks]
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    # patches (1,1) and (2,2) (flat 6 and 12; +1 for cls) share a window only in the shifted layer
    assert not masks[0][1 + 6, 1 + 12] and masks[1][1 + 6, 1 + 12]
    unshifted = tiny_vit(attention=partial(WindowedAttention, window_size=2, shift=False), depth=2)
    assert torch.equal(unshifted.blocks[0].attn.mask, unshifted.blocks[1].attn.mask)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_attention_maps_are_distributions_zero_outside_the_pattern(name, pooling):
    model = tiny_vit(attention=partial_attention(name), pooling=pooling)
    with record_attention(model) as attentions:
        logits = model(torch.rand(3, 3, 16, 20))
    num_prefix = 1 if pooling == "cls" else 0
    n = num_prefix + GRID[0] * GRID[1]
    assert logits.shape == (3, 3) and len(attentions) == 2
    for layer, attn in enumerate(attentions):
        assert attn.shape == (3, HEADS, n, n)
        torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, HEADS, n))
        outside = ~expected_visibility(name, layer, num_prefix)
        assert (attn[..., outside] == 0).all()
        if num_prefix:
            assert (attn[:, :, 0] > 0).all()  # the cls token attends to every token


def test_fast_and_visualization_paths_agree():
    model = tiny_vit(attention=partial_attention("local3")).eval()
    images = torch.rand(2, 3, 16, 20)
    with record_attention(model):
        recorded = model(images)  # the explicit softmax path
    torch.testing.assert_close(model(images), recorded)


def test_sparse_options_fail_clearly():
    with pytest.raises(ValueError, match="model.attention.stride=3 applies to pattern=strided only"):
        SparseAttention(DIM, num_heads=HEADS, grid_size=GRID, pattern="axial", stride=3)
    with pytest.raises(ValueError, match="model.attention.pattern='diagonal'"):
        SparseAttention(DIM, num_heads=HEADS, grid_size=GRID, pattern="diagonal")
    with pytest.raises(ValueError, match="model.attention.kernel_size=4 must be odd"):
        LocalAttention(DIM, num_heads=HEADS, grid_size=GRID, kernel_size=4)


def test_strided_default_stride_is_the_square_root_of_the_patch_count():
    attn = SparseAttention(DIM, num_heads=HEADS, grid_size=(4, 4), num_prefix_tokens=0, pattern="strided")
    index = torch.arange(16)
    expected = ((index[:, None] - index[None, :]).abs() < 4) | (index[:, None] % 4 == index[None, :] % 4)
    assert torch.equal(attn.mask, expected)


# ----------------------------------------------------------------------------------------- norms

def token_stats(norm: nn.Module, x: torch.Tensor):
    out = norm(x)  # (B, N, C)
    return out, out.mean(dim=-1), out.var(dim=-1, unbiased=False)


def test_norms_normalize_different_axes():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 16) * 3 + torch.linspace(-5, 5, 16)  # channels with different offsets
    ones = torch.ones(4, 10)

    out, mean, var = token_stats(nn.LayerNorm(16, eps=1e-6), x)  # each token: mean 0, var 1
    torch.testing.assert_close(mean, 0 * ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(var, ones, atol=1e-3, rtol=0)

    out, mean, var = token_stats(nn.RMSNorm(16, eps=1e-6), x)  # each token: mean square 1, mean kept
    torch.testing.assert_close(out.pow(2).mean(dim=-1), ones, atol=1e-3, rtol=0)
    assert mean.abs().max() > 0.1

    out, mean, var = token_stats(TokenBatchNorm(16).train(), x)  # each channel over batch and tokens
    torch.testing.assert_close(out.mean(dim=(0, 1)), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 1), unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert mean.abs().max() > 0.1 and (var - 1).abs().max() > 0.1  # tokens are not normalized one by one


def test_batchnorm_handles_pooled_vectors_and_uses_running_stats_at_eval():
    norm = TokenBatchNorm(8)
    norm(torch.randn(6, 5, 8) + 2.0)  # one training step moves the running mean towards 2
    assert norm(torch.randn(4, 8)).shape == (4, 8)  # mean pooling hands it (B, C)
    norm.eval()
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(norm(x), (x - norm.running_mean) / (norm.running_var + norm.eps).sqrt())


def test_pre_and_post_norm_give_different_functions_with_identical_weights():
    pre = tiny_vit(norm_placement="pre").eval()
    post = tiny_vit(norm_placement="post").eval()
    post.load_state_dict(pre.state_dict())  # the very same parameters
    images = torch.rand(2, 3, 16, 20)
    assert not torch.allclose(pre(images), post(images))
    # post-norm: a block's output is normalized (LayerNorm at init: weight 1, bias 0); pre-norm: not
    tokens = pre.pos_embed(torch.cat([pre.cls_token.expand(2, -1, -1), pre.patch_embed(images)], dim=1))
    (post_out, _), (pre_out, _) = post.blocks[0](tokens), pre.blocks[0](tokens)  # (tokens, token sizes)
    torch.testing.assert_close(post_out.mean(dim=-1), torch.zeros(2, 21), atol=1e-5, rtol=0)
    assert pre_out.mean(dim=-1).abs().max() > 1e-3


def test_unknown_placement_and_pooling_fail_clearly():
    with pytest.raises(ValueError, match="model.norm_placement='middle'"):
        tiny_vit(norm_placement="middle")
    with pytest.raises(ValueError, match="model.pooling='max'"):
        tiny_vit(pooling="max")


# ---------------------------------------------------------------------- position embeddings, pooling

def test_sincos_is_fixed_deterministic_and_zero_for_cls():
    a = tiny_vit(pos_embed=SinCosPositionEmbedding)
    torch.manual_seed(123)  # a different seed must not change a fixed embedding
    b = VisionTransformer(image_size=(16, 20), patch_size=4, in_channels=3, num_classes=3, embed_dim=DIM, depth=1,
                          num_heads=HEADS, mlp_dim=16, pos_embed=SinCosPositionEmbedding)
    weight = a.pos_embed.weight
    assert list(a.pos_embed.parameters()) == [] and not weight.requires_grad
    assert "pos_embed.weight" not in dict(a.named_parameters())
    torch.testing.assert_close(weight, b.pos_embed.weight)
    assert weight.shape == (1, 1 + 20, DIM)
    assert (weight[0, 0] == 0).all()  # cls gets no position
    # patch (0, 0): sin(0) = 0 and cos(0) = 1 in each quarter of the channels
    q = DIM // 4
    torch.testing.assert_close(weight[0, 1], torch.cat([torch.zeros(q), torch.ones(q), torch.zeros(q), torch.ones(q)]))
    assert len({tuple(row.tolist()) for row in weight[0, 1:]}) == 20  # every patch position is distinct
    a(torch.rand(2, 3, 16, 20)).sum().backward()
    assert weight.grad is None


def permute_patches(images: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch, patch)
    patches = patches[:, order].reshape(b, gh, gw, c, patch, patch)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_without_position_embedding_the_model_sees_a_bag_of_patches(pooling):
    images = torch.rand(2, 3, 16, 20)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    shuffled = permute_patches(images, 4, order)
    prefix = 1 if pooling == "cls" else 0
    bag = tiny_vit(pos_embed=NoPositionEmbedding, pooling=pooling).eval()
    x = torch.randn(2, prefix + 20, DIM)
    assert torch.equal(bag.pos_embed(x), x)  # adds nothing
    # shuffling the patches shuffles the patch tokens the same way, and leaves the logits alone
    tokens, tokens_of_shuffled = bag.forward_features(images), bag.forward_features(shuffled)
    torch.testing.assert_close(tokens_of_shuffled[:, prefix:], tokens[:, prefix:][:, order], atol=1e-5, rtol=0)
    torch.testing.assert_close(bag(images), bag(shuffled), atol=1e-5, rtol=0)
    for pos_embed in (None, SinCosPositionEmbedding):  # learned, sincos: a patch's token depends on its place
        positional = tiny_vit(pos_embed=pos_embed, pooling=pooling).eval()
        tokens, tokens_of_shuffled = positional.forward_features(images), positional.forward_features(shuffled)
        assert not torch.allclose(tokens_of_shuffled[:, prefix:], tokens[:, prefix:][:, order], atol=1e-3)


def test_mean_pooling_has_no_cls_token():
    model = tiny_vit(pooling="mean")
    assert model.cls_token is None and model.num_prefix_tokens == 0
    assert "cls_token" not in model.state_dict()
    assert model.pos_embed.weight.shape[1] == GRID[0] * GRID[1]
    tokens = model.forward_features(torch.rand(2, 3, 16, 20))
    assert tokens.shape == (2, GRID[0] * GRID[1], DIM)
    cls_model = tiny_vit(pooling="cls")
    assert cls_model.forward_features(torch.rand(2, 3, 16, 20)).shape == (2, 1 + GRID[0] * GRID[1], DIM)


# ------------------------------------------------------------------- shapes, sizes, summary, dims

@pytest.mark.parametrize("image_size,patch_size,in_channels", [(16, 4, 1), (32, 8, 3), ((16, 32), 4, 5), (24, 8, 13)])
def test_any_image_size_patch_size_and_channel_count(image_size, patch_size, in_channels):
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_classes=7,
                              embed_dim=DIM, depth=1, num_heads=HEADS, mlp_dim=16)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert model.grid_size == (h // patch_size, w // patch_size)
    assert model.patch_embed.flattened_patch_dim == patch_size * patch_size * in_channels
    assert model.patch_embed.proj.weight[0].numel() == patch_size * patch_size * in_channels
    assert model(torch.rand(2, in_channels, h, w)).shape == (2, 7)


def test_patch_size_that_does_not_tile_the_image_fails_clearly():
    with pytest.raises(ValueError, match="model.patch_size=5 .* does not tile image height 16"):
        VisionTransformer(image_size=16, patch_size=5, in_channels=3, num_classes=2, embed_dim=DIM, depth=1,
                          num_heads=HEADS, mlp_dim=16)


def test_summary_reports_parameters_and_flattened_patch_dim():
    model = VisionTransformer(image_size=32, patch_size=8, in_channels=5, num_classes=3, embed_dim=64, depth=2,
                              num_heads=4, mlp_dim=128)
    summary = model.summary()
    num_params = sum(p.numel() for p in model.parameters())
    assert f"{num_params / 1e6:.2f}M parameters" in summary
    assert "flattened_patch_dim 320" in summary  # 8 * 8 * 5
    assert "grid 4x4 = 16 patches + 1 cls" in summary


def test_architecture_sizes_shape_the_network():
    base = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 3, "embed_dim": 16, "depth": 2,
            "num_heads": 2, "mlp_dim": 32}
    model = VisionTransformer(**base)
    assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 2
    assert model.blocks[0].mlp.fc1.out_features == 32 and model.head.in_features == 16

    def count(module):
        return sum(p.numel() for p in module.parameters())

    for key, value in (("embed_dim", 32), ("depth", 3), ("mlp_dim", 64)):
        assert count(VisionTransformer(**{**base, key: value})) > count(model)
    more_heads = VisionTransformer(**{**base, "num_heads": 4})
    assert more_heads.blocks[0].attn.head_dim == 4 and count(more_heads) == count(model)  # heads split the width
    with pytest.raises(ValueError, match="model.embed_dim=16 is not divisible by model.num_heads=3"):
        VisionTransformer(**{**base, "num_heads": 3})


@pytest.mark.parametrize("key", ["dropout", "attention_dropout"])
def test_dropout_makes_training_forward_passes_stochastic(key):
    images = torch.rand(2, 3, 16, 20)
    model = tiny_vit(**{key: 0.5}).train()
    assert not torch.allclose(model(images), model(images))
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    no_dropout = tiny_vit().train()
    torch.testing.assert_close(no_dropout(images), no_dropout(images))
