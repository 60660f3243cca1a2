"""model/sharing: layers run shared weights, held once in the parameters, the state dict and the
checkpoints; `all` has 1/depth of the encoder parameters; resume is exact; pretrained is refused."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, read_summary, run_cli
from timm.utils import ModelEmaV3

from vitsweep.model import VisionTransformer, create_vit, record_attention
from vitsweep.model.attention import WindowedAttention
from vitsweep.model.sharing import Cycle, NoSharing, ShareAll
from vitsweep.trainer.checkpoint import restore, save_checkpoint

DEPTH = 6


def vit(sharing=None, **kwargs):
    torch.manual_seed(0)
    options = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 4, "embed_dim": 32, "depth": DEPTH,
               "num_heads": 2, "mlp_dim": 64, "drop_path": 0.0, **kwargs}
    return VisionTransformer(**options, sharing=sharing)


def encoder_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks."))


def test_all_has_one_depth_th_of_the_encoder_parameters():
    unshared, shared = vit(NoSharing()), vit(ShareAll())
    assert encoder_params(shared) * DEPTH == encoder_params(unshared)
    outside = sum(p.numel() for p in unshared.parameters()) - encoder_params(unshared)
    assert sum(p.numel() for p in shared.parameters()) == outside + encoder_params(unshared) // DEPTH


def test_per_layer_norms_and_cycles_count_what_they_own():
    block = encoder_params(vit(NoSharing())) // DEPTH
    norms = 2 * 2 * 32  # norm1 and norm2 of a layer: weight and bias
    assert encoder_params(vit(ShareAll(per_layer_norms=True))) == block + (DEPTH - 1) * norms
    assert encoder_params(vit(Cycle(num_blocks=3))) == 3 * block
    assert encoder_params(vit(Cycle(num_blocks=2, per_layer_norms=True))) == 2 * block + (DEPTH - 2) * norms


def test_layers_run_the_scheduled_blocks():
    model = vit(Cycle(num_blocks=2))
    for layer, block in enumerate(model.blocks):
        assert block.attn.qkv is model.blocks[layer % 2].attn.qkv and block.mlp is model.blocks[layer % 2].mlp
        assert block.attn.proj is model.blocks[layer % 2].attn.proj and block.norm1 is model.blocks[layer % 2].norm1
    assert model.blocks[0].mlp is not model.blocks[1].mlp
    assert "sharing cycle: layers run blocks [0, 1, 0, 1, 0, 1]" in model.summary()


def test_state_dict_names_each_shared_tensor_once_and_loads_back(tmp_path):
    model = vit(ShareAll(per_layer_norms=True))
    state = model.state_dict()
    assert not any(key.startswith(("blocks.1.attn.qkv", "blocks.5.mlp")) for key in state)
    assert "blocks.0.attn.qkv.weight" in state and "blocks.5.norm1.weight" in state  # norms are per layer
    assert len(state) == len({id(v) for v in state.values()})  # no tensor under two names
    assert sum(v.numel() for k, v in state.items() if k.startswith("blocks.")) == encoder_params(model)
    # a checkpoint round trip through restore (architecture check, strict load) gives the same function
    save_checkpoint(tmp_path / "last.pt", {"model": state, "config": {}})
    other = vit(ShareAll(per_layer_norms=True))
    torch.nn.init.normal_(other.blocks[0].attn.qkv.weight)
    restore(other, tmp_path / "last.pt")
    assert other.blocks[3].attn.qkv is other.blocks[0].attn.qkv  # still shared after loading
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(other.eval()(images), model.eval()(images))
    with pytest.raises(ValueError, match="another architecture"):
        restore(vit(NoSharing()), tmp_path / "last.pt")


def test_a_shared_weight_gets_the_gradient_of_every_layer_that_runs_it():
    model = vit(ShareAll())
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    F.cross_entropy(model(images), labels).backward()
    shared_grad = model.blocks[0].mlp.fc1.weight.grad.clone()
    # the same function with every layer's own copy of the weights: their gradients sum to the shared one
    unshared = vit(NoSharing())
    unshared.load_state_dict({k.replace("blocks.0.", f"blocks.{i}."): v for k, v in model.state_dict().items()
                              for i in range(DEPTH) if k.startswith("blocks.0.") or i == 0}, strict=True)
    F.cross_entropy(unshared(images), labels).backward()
    summed = sum(unshared.blocks[i].mlp.fc1.weight.grad for i in range(DEPTH))
    torch.testing.assert_close(shared_grad, summed, atol=1e-6, rtol=1e-4)


def test_ema_averages_each_shared_tensor_once():
    model = vit(ShareAll())
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(1.0)
    before = ema.module.blocks[0].mlp.fc1.weight.clone()
    ema.update(model)
    # one lerp half way to the new weights, not one per layer that shares the tensor
    torch.testing.assert_close(ema.module.blocks[0].mlp.fc1.weight, before + 0.5)


def test_shifted_windows_stay_per_layer_under_sharing():
    model = vit(ShareAll(), attention=partial(WindowedAttention, window_size=2, shift=True))
    offsets = [block.attn.offset for block in model.blocks]
    assert offsets == [0, 1] * (DEPTH // 2)  # each layer keeps its attention module and its shift
    assert model.blocks[1].attn.qkv is model.blocks[0].attn.qkv
    with record_attention(model) as attentions:
        model(torch.randn(1, 3, 16, 16))
    assert len(attentions) == DEPTH and not torch.equal(attentions[0] > 0, attentions[1] > 0)


def test_pretrained_weights_are_refused_and_bad_values_fail(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"model": vit().state_dict(), "config": {}}, weights)
    kwargs = {"image_size": 16, "patch_size": 4, "num_classes": 4, "embed_dim": 32, "depth": DEPTH, "num_heads": 2,
              "mlp_dim": 64}
    with pytest.raises(ValueError, match=r"model.pretrained=.*w.pt cannot start model/sharing=all: .* from scratch"):
        create_vit(pretrained=str(weights), sharing=ShareAll(), **kwargs)
    with pytest.raises(ValueError, match=r"model.sharing.num_blocks=7 exceeds model.depth=6"):
        vit(Cycle(num_blocks=7))
    with pytest.raises(ValueError, match=r"model.sharing.num_blocks=0 must be >= 1"):
        Cycle(num_blocks=0)


@pytest.mark.slow
def test_resume_of_a_shared_model_is_exact(tmp_path):
    args = [*TINY_RUN, "model.depth=3", "model/sharing=cycle", "model.sharing.num_blocks=2",
            "model.sharing.per_layer_norms=true", "trainer.max_epochs=2", "logger=none", "model.dropout=0.1"]
    run_cli(args, tmp_path / "straight")
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")  # stops after the first step, mid-epoch
    run_cli([*args, f"ckpt_path={tmp_path / 'stopped' / 'run' / 'checkpoints' / 'last.pt'}"], tmp_path / "resumed")
    straight, resumed = (torch.load(tmp_path / run / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
                         for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and not any(k.startswith("blocks.2.attn.qkv") for k in straight)
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=1e-6, msg=name)
    assert read_summary(tmp_path / "resumed" / "run")["steps"] == read_summary(tmp_path / "straight" / "run")["steps"]
