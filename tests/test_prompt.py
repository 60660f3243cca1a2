"""model/prompt (Visual Prompt Tuning): prompt tokens after cls, at the input (shallow) or per layer
(deep); with model.trainable=prompt+head only the prompts and the head train, and frozen weights get
no gradient; prompts are prefix tokens for pooling, attention patterns, pruning and figures."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitsweep.model import VisionTransformer, create_vit
from vitsweep.model.attention import WindowedAttention
from vitsweep.model.pretrained import freeze, load_pretrained
from vitsweep.model.prompt import DeepPrompt, ShallowPrompt
from vitsweep.viz.attention import collect_attentions, patch_attention_maps
from vitsweep.viz.explain import explain

DIM, DEPTH, LENGTH, CLASSES = 32, 3, 5, 4
SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": CLASSES, "embed_dim": DIM, "depth": DEPTH,
         "num_heads": 2, "mlp_dim": 64, "drop_path": 0.0}


def vit(prompt=None, **kwargs):
    torch.manual_seed(0)
    return VisionTransformer(**{**SHAPE, **kwargs}, prompt=prompt)


@pytest.mark.parametrize("kind,prompt_params", [(ShallowPrompt, LENGTH * DIM), (DeepPrompt, LENGTH * DIM * DEPTH)])
def test_prompt_plus_head_trains_exactly_the_prompts_and_the_head(kind, prompt_params):
    model = vit(partial(kind, length=LENGTH))
    names = freeze(model, "prompt+head")
    assert set(names) == {"prompt.tokens", "head.weight", "head.bias"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == prompt_params + (DIM * CLASSES + CLASSES)  # length x dim (x depth) + head
    # one training step: frozen weights get no gradient and do not move; prompts and head do
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in names), name
    assert model.prompt.tokens.grad.abs().sum() > 0
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(names)


def test_prompts_sit_after_cls_as_prefix_tokens():
    model = vit(partial(ShallowPrompt, length=LENGTH))
    assert model.num_prefix_tokens == 1 + LENGTH and model.num_cls_tokens == 1
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(torch.randn(2, 3, 16, 16))
    tokens = seen[0]  # (B, 1 + L + P, D)
    assert tokens.shape == (2, 1 + LENGTH + 16, DIM)
    torch.testing.assert_close(tokens[0, 1:1 + LENGTH], model.prompt.tokens[0])  # no position embedding on them
    assert "+ 1 cls + 5 prompt" in model.summary()
    assert model.pos_embed.weight.shape == (1, 1 + 16, DIM)  # the embedding keeps its (timm) shape


def test_deep_prompts_replace_the_previous_layers_prompts():
    model = vit(partial(DeepPrompt, length=LENGTH)).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(torch.randn(1, 3, 16, 16))
    for layer, tokens in enumerate(seen):
        torch.testing.assert_close(tokens[0, 1:1 + LENGTH], model.prompt.tokens[layer])
    # each layer's prompts matter: the logits depend on the last layer's too
    images = torch.randn(2, 3, 16, 16)
    logits = model(images)
    with torch.no_grad():
        model.prompt.tokens[DEPTH - 1].add_(torch.randn(LENGTH, DIM))  # not a constant: norm1 would remove it
    assert not torch.allclose(model(images), logits)


def test_mean_pooling_leaves_the_prompts_out():
    model = vit(partial(ShallowPrompt, length=LENGTH), pooling="mean").eval()
    assert model.num_prefix_tokens == LENGTH and model.cls_token is None
    features = model.forward_features(torch.randn(2, 3, 16, 16))  # (B, L + P, D)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True),
                               model.norm(features[:, LENGTH:].mean(dim=1)))


def test_prompts_are_global_under_restricted_attention():
    model = vit(partial(ShallowPrompt, length=2), attention=partial(WindowedAttention, window_size=2))
    mask = model.blocks[0].attn.mask  # (N, N): cls, 2 prompts, 16 patches
    assert mask.shape == (19, 19) and mask[:3].all() and mask[:, :3].all() and not mask[3:, 3:].all()
    model(torch.randn(1, 3, 16, 16))  # the blocked path runs with 3 prefix tokens


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_attention_figures_read_the_patch_grid_past_the_prompts(pooling):
    model = vit(partial(ShallowPrompt, length=LENGTH), pooling=pooling)
    _, attentions = collect_attentions(model, torch.randn(2, 3, 16, 16))
    maps = patch_attention_maps(attentions, model.num_prefix_tokens, model.grid_size, model.cls_token is not None)
    assert maps.shape == (2, DEPTH, 2, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, DEPTH, 2))
    heatmaps = explain(model, torch.randn(2, 3, 16, 16), None, ["rollout", "gradcam"])
    assert all(h.shape == (2, 4, 4) and torch.isfinite(h).all() for h in heatmaps.values())


def test_pretrained_backbone_loads_and_the_prompts_start_fresh(tmp_path):
    backbone = vit()
    torch.save({"model": backbone.state_dict(), "config": {}}, tmp_path / "best.pt")
    model = create_vit(**SHAPE, prompt=partial(DeepPrompt, length=LENGTH), pretrained=str(tmp_path / "best.pt"),
                       trainable="prompt+head")
    assert "prompt.tokens (prompt tokens start from their init)" in model.load_report.reinitialized
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, backbone.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(model.pos_embed.weight, backbone.pos_embed.weight)
    # and a timm ViT state dict (no prompts) loads the same way
    report = load_pretrained(vit(partial(ShallowPrompt, length=2)), str(tmp_path / "best.pt"))
    assert report.reinitialized == ["prompt.tokens (prompt tokens start from their init)"]


def test_prompt_options_fail_clearly():
    with pytest.raises(ValueError, match=r"model.prompt.length=0 must be >= 1"):
        vit(partial(ShallowPrompt, length=0))
    with pytest.raises(ValueError, match=r"model.trainable=prompt\+head but the model has no prompt tokens"):
        freeze(vit(), "prompt+head")
