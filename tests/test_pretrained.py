"""Pretrained weights: timm -> vitsweep conversion is exact, adaptations give working models,
sources load from every format, and freezing leaves only the chosen parameters trainable."""

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitsweep.model import VisionTransformer, create_vit
from vitsweep.model.norm import TokenBatchNorm
from vitsweep.model.pos_embed import SinCosPositionEmbedding
from vitsweep.model.pretrained import (
    TRAINABLE,
    PretrainedLoadError,
    adapt_state_dict,
    convert_timm_state_dict,
    freeze,
    load_pretrained,
)

SHAPES = [  # image size, patch, depth, heads, bands, width: square, non-square grid, 1 band, 6 bands
    {"image_size": 32, "patch_size": 8, "depth": 2, "num_heads": 2, "in_channels": 3, "embed_dim": 32},
    {"image_size": (16, 32), "patch_size": 8, "depth": 2, "num_heads": 4, "in_channels": 3, "embed_dim": 32},
    {"image_size": 24, "patch_size": 4, "depth": 1, "num_heads": 4, "in_channels": 1, "embed_dim": 48},
    {"image_size": 16, "patch_size": 4, "depth": 2, "num_heads": 2, "in_channels": 6, "embed_dim": 64},
]
NUM_CLASSES = 5


def make_timm(shape, pooling="cls", num_classes=NUM_CLASSES, **extra):
    pool = {"global_pool": "token"} if pooling == "cls" else {"global_pool": "avg", "class_token": False}
    model = TimmViT(img_size=shape["image_size"], patch_size=shape["patch_size"], in_chans=shape["in_channels"],
                    num_classes=num_classes, embed_dim=shape["embed_dim"], depth=shape["depth"],
                    num_heads=shape["num_heads"], mlp_ratio=2.0, **pool, **extra)
    with torch.no_grad():  # timm inits the cls token and biases tiny or zero: make every tensor count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def make_vitsweep(shape, pooling="cls", num_classes=NUM_CLASSES, **overrides):
    args = dict(shape, num_classes=num_classes, mlp_dim=2 * shape["embed_dim"], pooling=pooling)
    args.update(overrides)
    return VisionTransformer(**args).eval()


def images_for(model, batch=2):
    gh, gw = model.grid_size
    stride = model.patch_embed.proj.stride[0]
    size = ((gh - 1) * stride + model.patch_embed.proj.kernel_size[0], (gw - 1) * stride + model.patch_embed.proj.kernel_size[1])
    return torch.randn(batch, model.patch_embed.proj.in_channels, *size)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['image_size']}px-p{s['patch_size']}-c{s['in_channels']}")
def test_converted_timm_weights_give_the_same_logits(shape, pooling):
    timm_model = make_timm(shape, pooling)
    model = make_vitsweep(shape, pooling)
    state_dict = adapt_state_dict(convert_timm_state_dict(timm_model.state_dict(), model), model)
    assert set(state_dict) == set(model.state_dict())
    model.load_state_dict(state_dict)
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_timm_file_round_trip_through_load_pretrained(tmp_path, suffix, pooling):
    shape = SHAPES[1]
    timm_model = make_timm(shape, pooling)
    path = tmp_path / f"timm_vit{suffix}"
    state_dict = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    save_file(state_dict, str(path)) if suffix == ".safetensors" else torch.save(state_dict, path)

    model = make_vitsweep(shape, pooling)
    report = load_pretrained(model, str(path))
    assert not (report.resampled or report.reinitialized or report.adapted_channels)
    assert set(report.loaded) == set(model.state_dict())
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=0)


def test_factory_loads_pretrained_and_freezes(tmp_path):
    shape = SHAPES[0]
    timm_model = make_timm(shape)
    path = tmp_path / "timm_vit.pth"
    torch.save(timm_model.state_dict(), path)
    model = create_vit(**dict(shape, num_classes=NUM_CLASSES, mlp_dim=2 * shape["embed_dim"]), pretrained=str(path),
                       trainable="head").eval()
    assert model.load_report.source == str(path) and not model.load_report.reinitialized
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_position_embedding_resampled_to_a_new_grid(tmp_path):
    shape = SHAPES[0]  # 32 px / patch 8: a 4x4 grid
    timm_model = make_timm(shape)
    path = tmp_path / "timm_vit.pth"
    torch.save(timm_model.state_dict(), path)

    bigger = make_vitsweep(shape, image_size=48)  # 6x6 grid
    report = load_pretrained(bigger, str(path))
    assert report.resampled and "pos_embed.weight" in report.resampled[0]
    pos = bigger.pos_embed.weight
    assert pos.shape == (1, 1 + 36, shape["embed_dim"])
    torch.testing.assert_close(pos[:, :1], timm_model.pos_embed[:, :1])  # the cls position is kept as is
    logits = bigger(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()

    same_grid = make_vitsweep(shape)
    load_pretrained(same_grid, str(path))
    torch.testing.assert_close(same_grid.pos_embed.weight, timm_model.pos_embed, atol=0, rtol=0)


def test_patch_size_change_resamples_kernel_and_grid(tmp_path):
    shape = SHAPES[0]  # patch 8: a 4x4 grid
    path = tmp_path / "timm_vit.pth"
    torch.save(make_timm(shape).state_dict(), path)
    model = make_vitsweep(shape, patch_size=4)  # an 8x8 grid of 4x4 patches
    report = load_pretrained(model, str(path))
    assert {entry.split(" ")[0] for entry in report.resampled} == {"pos_embed.weight", "patch_embed.proj.weight"}
    assert model.patch_embed.proj.weight.shape[-2:] == (4, 4) and model.pos_embed.weight.shape[1] == 1 + 64
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()


def test_resampling_keeps_a_constant_embedding_constant():
    shape = SHAPES[0]
    source = make_vitsweep(shape)
    constant = torch.randn(shape["embed_dim"])
    with torch.no_grad():
        source.pos_embed.weight[:, 1:] = constant
    target = make_vitsweep(shape, image_size=56)  # 7x7: not a multiple of 4x4
    state_dict = adapt_state_dict(source.state_dict(), target)
    torch.testing.assert_close(state_dict["pos_embed.weight"][0, 1:], constant.expand(49, -1), atol=1e-5, rtol=0)


def test_cls_checkpoint_into_mean_pooling_and_back(tmp_path):
    shape = SHAPES[0]
    for source_pooling, target_pooling in (("cls", "mean"), ("mean", "cls")):
        path = tmp_path / f"{source_pooling}.pth"
        torch.save(make_timm(shape, source_pooling).state_dict(), path)
        model = make_vitsweep(shape, target_pooling)
        report = load_pretrained(model, str(path))
        assert model.pos_embed.weight.shape[1] == model.num_prefix_tokens + 16
        assert report.notes  # the final norm changes place
        assert (report.dropped if target_pooling == "mean" else report.reinitialized)
        logits = model(images_for(model))
        assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()


def test_head_reinitialized_when_classes_differ(tmp_path):
    shape = SHAPES[0]
    timm_model = make_timm(shape, num_classes=10)
    path = tmp_path / "timm_vit.pth"
    torch.save(timm_model.state_dict(), path)
    model = make_vitsweep(shape, num_classes=3)
    head_before = model.head.weight.detach().clone()
    report = load_pretrained(model, str(path))
    assert any(entry.startswith("head.weight") for entry in report.reinitialized)
    torch.testing.assert_close(model.head.weight, head_before, atol=0, rtol=0)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, timm_model.blocks[0].attn.qkv.weight, atol=0, rtol=0)
    assert model(images_for(model)).shape == (2, 3)


@pytest.mark.parametrize("bands", [4, 13])
def test_channel_adaptation_from_rgb(tmp_path, bands):
    shape = SHAPES[0]
    timm_model = make_timm(shape)
    path = tmp_path / "timm_vit.pth"
    torch.save(timm_model.state_dict(), path)
    model = make_vitsweep(shape, in_channels=bands)
    report = load_pretrained(model, str(path))
    assert report.adapted_channels
    assert model.patch_embed.proj.weight.shape[1] == bands

    # an image whose bands are all the same grey gives exactly the RGB model's output on that grey
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        multispectral_logits = model(grey.expand(-1, bands, -1, -1))
        torch.testing.assert_close(multispectral_logits, timm_model(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)
        assert torch.isfinite(model(torch.randn(2, bands, 32, 32))).all()


@pytest.mark.parametrize("components", [
    {"pooling": "mean"},
    {"pooling": "cls", "norm": TokenBatchNorm, "pos_embed": SinCosPositionEmbedding},  # buffers, no pos weight
], ids=["mean-layernorm-learned", "cls-batchnorm-sincos"])
def test_vitsweep_checkpoint_loads(tmp_path, components):
    shape = SHAPES[2]
    trained = make_vitsweep(shape, **components)
    with torch.no_grad():  # move BatchNorm running statistics away from their init
        trained.train()(images_for(trained, batch=4) + 1.0)
    trained.eval()
    path = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "config": {"model": {"embed_dim": shape["embed_dim"]}}, "epoch": 3}, path)
    model = make_vitsweep(shape, **components)
    report = load_pretrained(model, str(path))
    assert set(report.loaded) == set(model.state_dict())
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), atol=0, rtol=0)


def test_shape_mismatch_is_an_error_unless_skipped(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save({"model": make_vitsweep(SHAPES[0], embed_dim=64).state_dict(), "config": {}}, path)
    with pytest.raises(PretrainedLoadError, match="strict_shapes=False"):
        load_pretrained(make_vitsweep(SHAPES[0]), str(path))
    model = make_vitsweep(SHAPES[0])
    report = load_pretrained(model, str(path), strict_shapes=False)
    assert any("shape mismatch" in entry for entry in report.dropped)
    assert torch.isfinite(model(images_for(model))).all()


def test_unmappable_timm_checkpoints_fail_clearly():
    shape = SHAPES[0]
    model = make_vitsweep(shape)
    with pytest.raises(PretrainedLoadError, match="register tokens"):
        convert_timm_state_dict(make_timm(shape, reg_tokens=2).state_dict(), model)
    with pytest.raises(PretrainedLoadError, match="LayerScale"):
        convert_timm_state_dict(make_timm(shape, init_values=0.1).state_dict(), model)


def test_identity_layer_scale_is_dropped_and_exact():
    shape = SHAPES[0]
    timm_model = make_timm(shape, init_values=1.0)
    with torch.no_grad():  # make_timm perturbed every tensor; identity LayerScale means gamma == 1
        for name, param in timm_model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    model = make_vitsweep(shape)
    model.load_state_dict(adapt_state_dict(convert_timm_state_dict(timm_model.state_dict(), model), model))
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=0)


def test_timm_no_embed_class_converts_exactly():
    # timm adds no position embedding to the cls token; ours covers it, so its row must become zero
    shape = SHAPES[0]
    timm_model = make_timm(shape, no_embed_class=True)
    model = make_vitsweep(shape)
    model.load_state_dict(adapt_state_dict(convert_timm_state_dict(timm_model.state_dict(), model), model))
    assert model.pos_embed.weight[0, 0].abs().max() == 0
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=0)


def test_timm_hub_offline_fails_with_one_clear_line(monkeypatch, tmp_path):
    # offline mode and an empty cache: the hub can't be reached and nothing is cached, fast
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = make_vitsweep(SHAPES[0])
    with pytest.raises(PretrainedLoadError) as error:
        load_pretrained(model, "timm:vit_tiny_patch16_224")
    message = str(error.value)
    assert "\n" not in message
    assert "model.pretrained=timm:vit_tiny_patch16_224" in message
    assert "unreachable" in message and "model.pretrained=/path/to/vit_tiny_patch16_224.pth" in message

    with pytest.raises(PretrainedLoadError, match="no model named"):
        load_pretrained(model, "timm:not_a_model")
    with pytest.raises(FileNotFoundError, match="model.pretrained=missing.pt"):
        load_pretrained(model, "missing.pt")


def test_freeze_leaves_only_the_chosen_parameters_trainable():
    model = make_vitsweep(SHAPES[0])
    all_names = {n for n, _ in model.named_parameters()}
    last = len(model.blocks) - 1
    expected = {
        "all": all_names,
        "head": {"head.weight", "head.bias"},
        "head+norm": {"head.weight", "head.bias", "norm.weight", "norm.bias"},
        "head+norm+last_block": {"head.weight", "head.bias", "norm.weight", "norm.bias"}
        | {n for n in all_names if n.startswith(f"blocks.{last}.")},
    }
    assert set(expected) == set(TRAINABLE) - {"prompt+head"}  # needs prompt tokens: tests/test_prompt.py
    for trainable, names in expected.items():
        returned = freeze(model, trainable)
        assert set(returned) == names
        assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    with pytest.raises(ValueError, match="head\\+norm"):
        freeze(model, "backbone")
