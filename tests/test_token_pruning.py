"""model/token_pruning: EViT keeps ceil(n * keep_rate) patch tokens plus one fused token at its
layers, ToMe merges r tokens per layer; both pick the tokens the papers say, keep prefix tokens,
train, and are refused where they cannot compose."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitsweep.model import VisionTransformer
from vitsweep.model.attention import LocalAttention, MultiHeadAttention, WindowedAttention
from vitsweep.model.prompt import ShallowPrompt
from vitsweep.model.token_pruning import EViT, FuseInattentiveTokens, MergeTokens, ToMe

DIM, HEADS = 32, 4


def vit(pruning, depth=6, image_size=32, patch_size=4, **kwargs):
    torch.manual_seed(0)
    return VisionTransformer(image_size=image_size, patch_size=patch_size, in_channels=3, num_classes=5, embed_dim=DIM,
                             depth=depth, num_heads=HEADS, mlp_dim=64, drop_path=0.0, token_pruning=pruning, **kwargs)


def observed_tokens(model, images) -> list[int]:
    """Tokens entering each block, then leaving the last, as the forward pass really ran."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for block in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, args, out: seen.append(out[0].shape[1])))
    model(images)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("keep_rate,layers", [(0.7, None), (0.5, [0, 2, 5]), (0.25, [1]), (1.0, [0, 3])])
def test_evit_keeps_ceil_n_keep_rate_plus_one_fused_token_at_its_layers(keep_rate, layers):
    model = vit(partial(EViT, keep_rate=keep_rate, layers=layers))
    expected, n = [65], 64  # cls + 8x8 patches
    chosen = layers if layers is not None else [6 // 4, 6 // 2, 3 * 6 // 4]  # EViT's layers scaled to depth 6
    for layer in range(6):
        if layer in chosen and math.ceil(n * keep_rate) < n:
            n = math.ceil(n * keep_rate) + 1  # the kept patch tokens, then the fused one
        expected.append(1 + n)
    assert observed_tokens(model, torch.randn(2, 3, 32, 32)) == expected == model.tokens_per_layer()
    assert f"tokens per layer {expected}" in model.summary()


@pytest.mark.parametrize("r", [1, 4, 13, 40])
def test_tome_merges_r_tokens_per_layer(r):
    model = vit(partial(ToMe, r=r))
    expected = [65]
    for _ in range(6):  # N - r, until fewer than 2r patch tokens are left to pair
        expected.append(expected[-1] - min(r, (expected[-1] - 1) // 2))
    assert observed_tokens(model, torch.randn(2, 3, 32, 32)) == expected == model.tokens_per_layer()
    if r == 4:
        assert expected == [65, 61, 57, 53, 49, 45, 41]


def qkv_for(x, keys=None, cls_query=None):
    """A fused projection (B, N, 3C) with the given keys / cls query (random elsewhere)."""
    B, N, C = x.shape
    q, k, v = torch.randn(B, N, C), torch.randn(B, N, C), torch.randn(B, N, C)
    if keys is not None:
        k = keys.expand(B, -1, -1)
    if cls_query is not None:
        q[:, 0] = cls_query
    return torch.cat([q, k, v], dim=-1)


def test_evit_keeps_the_tokens_cls_attends_to_most_and_fuses_the_rest_by_that_attention():
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 6, DIM)  # cls + 6 patch tokens
    qkv = qkv_for(x)
    reduce = FuseInattentiveTokens(keep_rate=0.5, num_heads=HEADS, num_prefix_tokens=1)
    out, size = reduce(x, qkv, None)
    assert out.shape == (1, 1 + 3 + 1, DIM) and size is None
    # the cls token's attention, from the test's own reading of the paper: per head, then averaged
    q, k = qkv[..., :DIM].view(1, 7, HEADS, -1), qkv[..., DIM:2 * DIM].view(1, 7, HEADS, -1)
    scores = torch.einsum("hd,nhd->hn", q[0, 0], k[0]) / math.sqrt(DIM // HEADS)  # (nh, N)
    attentiveness = scores.softmax(dim=-1).mean(dim=0)[1:]  # (6,) over the patch tokens
    top = attentiveness.topk(3).indices
    rest = [i for i in range(6) if i not in top.tolist()]
    torch.testing.assert_close(out[0, 0], x[0, 0])  # cls untouched, first
    torch.testing.assert_close(out[0, 1:4], x[0, 1 + top])
    fused = sum(attentiveness[i] * x[0, 1 + i] for i in rest)  # x_fused = sum_i a_i x_i
    torch.testing.assert_close(out[0, 4], fused)


def head_keys(*per_token: torch.Tensor) -> torch.Tensor:
    """(1, N, DIM) keys: the same head_dim vector in every head for each token."""
    return torch.stack(per_token)[None].repeat(1, 1, HEADS)


def test_tome_merges_the_most_similar_pairs_as_size_weighted_averages():
    e = torch.eye(DIM // HEADS)
    # patch tokens 0..5: set A = {0, 2, 4}, set B = {1, 3, 5}. Keys: A0 is nearly B3's, A2 close to B1's,
    # A4 like none of them: with r = 2, A0 joins B3 and A2 joins B1
    keys = head_keys(e[0], 0.98 * e[2] + 0.2 * e[5], e[1], 0.8 * e[1] + 0.6 * e[7], e[2], e[3], e[4])
    x = torch.randn(1, 7, DIM)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0]])  # tokens that merged before count more
    out, new_size = MergeTokens(r=2, num_heads=HEADS, num_prefix_tokens=1)(x, qkv_for(x, keys=keys), size)
    assert out.shape == (1, 5, DIM)
    a0, b1, a2, b3, a4, b5 = x[0, 1:]
    torch.testing.assert_close(out[0, 0], x[0, 0])  # cls untouched
    torch.testing.assert_close(out[0, 1], a4)  # the unmerged A token
    torch.testing.assert_close(out[0, 2], (1 * a2 + 1 * b1) / 2)  # B1 with A2 merged in
    torch.testing.assert_close(out[0, 3], (2 * a0 + 3 * b3) / 5)  # B3 with A0, by size
    torch.testing.assert_close(out[0, 4], b5)
    assert new_size.tolist() == [[1.0, 1.0, 2.0, 5.0, 1.0]]
    # what the tokens stand for is conserved: total size, and the size-weighted sum of the features
    assert new_size.sum() == size.sum()
    torch.testing.assert_close((out * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_proportional_attention_counts_a_merged_token_as_its_size():
    # ToMe's log(size) bias: attending to one token of size 3 is attending to 3 copies of it
    attn = MultiHeadAttention(DIM, num_heads=HEADS, grid_size=(2, 2), num_prefix_tokens=1)
    x = torch.randn(1, 4, DIM)
    merged = attn(x, size=torch.tensor([[1.0, 1.0, 3.0, 1.0]]))
    copies = attn(torch.cat([x[:, :3], x[:, 2:3], x[:, 2:3], x[:, 3:]], dim=1))  # token 2 three times
    torch.testing.assert_close(merged, copies[:, [0, 1, 2, 5]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduce", [MergeTokens(r=3, num_heads=HEADS, num_prefix_tokens=3),
                                    FuseInattentiveTokens(keep_rate=0.25, num_heads=HEADS, num_prefix_tokens=3)],
                         ids=["tome", "evit"])
def test_prefix_tokens_are_never_pruned_or_merged(reduce):
    # cls + 2 prompt tokens whose keys equal the patch keys (ToMe's most similar) and which the cls
    # query attends to most (EViT's most attentive): they still stay, first and unchanged
    e = torch.eye(DIM // HEADS)
    keys = head_keys(*[e[0]] * 9)
    x = torch.randn(2, 9, DIM)
    out, _ = reduce(x, qkv_for(x, keys=keys), None)
    assert out.shape[1] == 6
    torch.testing.assert_close(out[:, :3], x[:, :3])


def test_the_model_keeps_prompt_tokens_through_merging():
    model = vit(partial(ToMe, r=8), prompt=partial(ShallowPrompt, length=3))
    assert model.num_prefix_tokens == 4 and model.tokens_per_layer() == [68, 60, 52, 44, 36, 28, 20]
    assert observed_tokens(model, torch.randn(1, 3, 32, 32)) == model.tokens_per_layer()


@pytest.mark.parametrize("pruning", [partial(EViT, keep_rate=0.5), partial(ToMe, r=6)], ids=["evit", "tome"])
def test_pruned_models_train(pruning):
    model = vit(pruning).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 5
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # every parameter gets a gradient: what a pruned token carried still reaches the loss (fused / merged)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("attention", [partial(WindowedAttention, window_size=2), partial(LocalAttention)])
def test_pruning_refuses_attention_patterns_that_need_the_grid(attention):
    with pytest.raises(ValueError, match=r"model/token_pruning=tome cannot run with .*Attention: .* use "
                                         r"model/attention=full"):
        vit(partial(ToMe, r=2), attention=attention)


def test_pruning_refuses_mean_pooling_and_bad_values():
    with pytest.raises(ValueError, match=r"model/token_pruning=evit .* model.pooling=mean has no cls token"):
        vit(partial(EViT), pooling="mean")
    with pytest.raises(ValueError, match=r"model/token_pruning=tome with model.pooling=mean"):
        vit(partial(ToMe), pooling="mean")
    with pytest.raises(ValueError, match=r"model.token_pruning.keep_rate=0 must be in \(0, 1\]"):
        vit(partial(EViT, keep_rate=0))
    with pytest.raises(ValueError, match=r"model.token_pruning.layers=\[6\] must be layer indices in 0..5"):
        vit(partial(EViT, layers=[6]))
    with pytest.raises(ValueError, match=r"model.token_pruning.r=-1 must be >= 0"):
        vit(partial(ToMe, r=-1))
