"""The blocked computations of the attention patterns (windows, Halo blocks, rows and columns, bands
and lanes) give
what the dense masked product gives (the reference that defines each pattern), within 1e-5, values
and gradients: shifted windows and not, with and without a cls token (and with prompt tokens as
more prefix tokens), on grids the window or block does not divide."""

import itertools

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from vitsweep.model.attention import LocalAttention, SparseAttention, WindowedAttention
from vitsweep.model.blocked_attention import from_windows, to_windows, window_region_mask

DIM, HEADS = 24, 3
# (rows, columns): square and not, multiples of 2, 3 and 4 and not
GRIDS = [(4, 4), (4, 5), (7, 9), (8, 8), (5, 3), (9, 6)]


def blocked_and_masked(attn, batch: int = 2, seed: int = 0):
    """The fast path and the reference on the same random tokens: outputs and input gradients."""
    torch.manual_seed(seed)
    n = attn.num_prefix_tokens + attn.grid_size[0] * attn.grid_size[1]
    x = torch.randn(batch, n, DIM)
    probe = torch.randn(batch, n, DIM)  # a random cotangent, so every output element counts
    results = []
    for path in ("blocked", "masked"):
        tokens = x.clone().requires_grad_(True)
        qkv = attn.qkv(tokens)
        out = attn.attend(qkv, None, 0.0) if path == "blocked" else attn.masked_attention(qkv)[0]
        (grad,) = torch.autograd.grad((out * probe).sum(), tokens)
        results.append((out, grad))
    return results


def assert_same(attn):
    (out, grad), (ref_out, ref_grad) = blocked_and_masked(attn)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window", [2, 3, 4])
@pytest.mark.parametrize("layer", [0, 1])  # with shift=True, layer 1 is shifted
@pytest.mark.parametrize("num_prefix", [0, 1, 3])  # none (mean pooling), cls, cls + 2 prompts
def test_windowed_per_window_equals_the_masked_reference(grid, window, layer, num_prefix):
    attn = WindowedAttention(DIM, num_heads=HEADS, grid_size=grid, num_prefix_tokens=num_prefix, layer_idx=layer,
                             window_size=window, shift=True)
    assert attn.offset == (window // 2 if layer == 1 else 0)
    assert_same(attn)


@pytest.mark.parametrize("grid", [(4, 5), (8, 8)])
def test_unshifted_windows_equal_the_masked_reference_on_every_layer(grid):
    for layer in (0, 1):
        attn = WindowedAttention(DIM, num_heads=HEADS, grid_size=grid, layer_idx=layer, window_size=2, shift=False)
        assert attn.offset == 0
        assert_same(attn)


def test_window_partition_rolls_the_grid_and_round_trips():
    grid = torch.arange(5 * 7).view(1, 5, 7, 1).float()  # (B, H, W, 1): each position's flat index
    windows = to_windows(grid, window=3, offset=1)  # padded to 6 x 9, rolled by -1: 2 x 3 windows of 9
    assert windows.shape == (6, 9, 1)
    # the first window starts at (1, 1) of the grid: the roll moved row/column 0 to the end
    assert windows[0, :3, 0].tolist() == [8.0, 9.0, 10.0]
    torch.testing.assert_close(from_windows(windows, 1, (5, 7), window=3, offset=1), grid)


def test_border_mask_separates_the_regions_that_the_roll_brings_together():
    # Swin's mask: on a 4x4 grid with windows of 2 shifted by 1, the last window (after the roll)
    # holds patch (3, 3) and the patches of row 0 and column 0 that wrapped around: 4 regions
    mask = window_region_mask((4, 4), window=2, offset=1, num_prefix=1)  # (nW, 1, T, 1 + T)
    assert mask.shape == (4, 1, 4, 5) and mask[..., 0].all()  # the cls key is always visible
    last = mask[3, 0, :, 1:]
    assert torch.equal(last, torch.eye(4, dtype=torch.bool))  # (3,3), (3,0), (0,3), (0,0): each alone
    assert mask[0, 0, :, 1:].all()  # the first window is one whole region
    assert window_region_mask((4, 4), window=2, offset=0, num_prefix=1) is None  # nothing to mask


def test_border_mask_matches_timm_swin():
    # timm's SwinTransformerBlock builds Swin's attention mask for a shifted block; ours (without
    # prefix tokens, on a grid the window divides) allows exactly the same pairs
    block = SwinTransformerBlock(dim=DIM, input_resolution=(8, 8), num_heads=HEADS, window_size=4, shift_size=2)
    timm_allowed = block.attn_mask == 0  # (nW, T, T): 0 where allowed, -100 where masked
    ours = window_region_mask((8, 8), window=4, offset=2, num_prefix=0)[:, 0]
    assert torch.equal(ours, timm_allowed)


@pytest.mark.parametrize("grid,kernel,num_prefix,halo", [
    ((26, 25), 3, 1, True), ((25, 24), 3, 0, True), ((30, 29), 5, 1, True), ((19, 23), 1, 2, True),
    ((12, 12), 3, 1, False), ((4, 5), 3, 1, False),  # short sequences: the dense masked product is faster
])
def test_local_attention_equals_the_masked_reference(grid, kernel, num_prefix, halo):
    attn = LocalAttention(DIM, num_heads=HEADS, grid_size=grid, num_prefix_tokens=num_prefix, kernel_size=kernel)
    # Halo blocks from 6x the keys of a halo window ((8 + kernel - 1)²); grids the block does not divide
    assert attn.halo == halo
    assert_same(attn)


@pytest.mark.parametrize("grid,num_prefix", itertools.product(GRIDS + [(16, 11)], [0, 1, 3]))
def test_axial_rows_and_columns_equal_the_masked_reference(grid, num_prefix):
    attn = SparseAttention(DIM, num_heads=HEADS, grid_size=grid, num_prefix_tokens=num_prefix, pattern="axial")
    assert_same(attn)


@pytest.mark.parametrize("grid,stride", [((6, 6), None), ((6, 6), 4), ((7, 9), None), ((4, 5), 3), ((3, 3), 1),
                                         ((1, 7), 7), ((5, 3), 2)])
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_strided_band_and_lanes_equal_the_masked_reference(grid, stride, num_prefix):
    # stride None: round(sqrt(P)); strides that do not divide P leave a padded last row
    attn = SparseAttention(DIM, num_heads=HEADS, grid_size=grid, num_prefix_tokens=num_prefix, pattern="strided",
                           stride=stride)
    assert_same(attn)


@pytest.mark.parametrize("attn", [
    WindowedAttention(DIM, num_heads=HEADS, grid_size=(4, 4), window_size=2, layer_idx=1),
    LocalAttention(DIM, num_heads=HEADS, grid_size=(12, 12)),
    SparseAttention(DIM, num_heads=HEADS, grid_size=(4, 4)),
    SparseAttention(DIM, num_heads=HEADS, grid_size=(4, 4), pattern="strided"),
], ids=["windowed", "local", "axial", "strided"])
def test_blocked_paths_refuse_a_sequence_of_another_length(attn):
    with pytest.raises(ValueError, match=r"was built for \d+ tokens .* input has 10"):
        attn(torch.randn(1, 10, DIM))


def test_attention_dropout_reaches_the_blocked_path():
    attn = WindowedAttention(DIM, num_heads=HEADS, grid_size=(4, 4), window_size=2, attn_drop=0.5).train()
    x = torch.randn(2, 17, DIM)
    assert not torch.allclose(attn(x), attn(x))  # training: dropped attention weights differ per call
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
