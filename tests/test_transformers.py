"""Transformers (issue 11): class tokens, window partitions and shifted windows, exactly.

The oracle is the gradient support (``tests/gradient_support.py``): with random weights in float64, the
bounding box of the input pixels whose gradient is nonzero for a unit must equal ``box`` of that unit. Attention mixes its
window (or everything) through a softmax whose gradient is nonzero almost surely, and Swin masks
the wrap-around of its shifted windows with -100 (not -inf), so those pixels are in the support too.
"""

import warnings

import pytest
import torch
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from rf_callback import UnsupportedLayerError, receptive_fields, receptive_maps
from rf_callback.selection import all_layers, default_layers, mappable, resolve_layers
from tests.gradient_support import assert_rows_match_gradient_support


def test_vit_class_token_rows_are_exact_until_attention_then_global():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=12, mlp_dim=16)
    table = receptive_fields(vit, (3, 32, 32))
    before = table["encoder.layers.encoder_layer_0.ln_1"]  # class token + 4x4 patches, before any attention
    assert (before.size, before.stride, before.output_shape) == ((8, 8), (8, 8), (4, 4))
    assert before.tensor_shape == (1, 17, 12)
    assert table["encoder.layers.encoder_layer_0.self_attention"].is_global
    assert table["heads.head"].is_global
    assert assert_rows_match_gradient_support(vit, (3, 32, 32)) > 50


class ClassTokens(nn.Module):
    """Two prefix tokens, then positions: patch tokens dropped back to a grid (``x[:, 2:]``) for a dense head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.tokens = nn.Parameter(torch.randn(1, 2, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1))
        self.cls = x[:, 0]  # a parameter, normalized: it depends on no pixel
        grid = x[:, 2:].transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
        return self.head(grid)


def test_class_tokens_can_be_dropped_back_to_the_grid():
    table = receptive_fields(ClassTokens(), (1, 16, 16))
    assert table["norm"].size == (4, 4) and table["norm"].tensor_shape == (1, 18, 8)
    assert table["head"].size == (12, 12) and table["head"].stride == (4, 4)
    assert_rows_match_gradient_support(ClassTokens(), (1, 16, 16))


def small_swin(v2: bool = False) -> SwinTransformer:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[3, 3], **extra)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin-v2"])
def test_swin_windows_and_shifted_windows_are_exact(v2):
    """12x12 tokens in 3x3 windows, then windows shifted by 1 (rolls, masked wrap-around), merging, 6x6."""
    model = small_swin(v2)
    table = receptive_fields(model, (3, 24, 24))
    plain = table["features.1.0.attn"]  # a 3x3 window of 2x2 patches: 6 pixels, at the patches' stride 2
    assert (plain.size, plain.stride) == ((6, 6), (2, 2))
    assert plain.box(4, 4) == (6, 6, 12, 12) and plain.box(5, 5) == (6, 6, 12, 12)  # the same window
    shifted = table["features.1.1.attn"]
    assert shifted.box(4, 4) == (6, 6, 18, 18)  # tokens 4..6 (shifted by 1), which saw windows 3..5 and 6..8
    assert shifted.box(0, 0) == (0, 0, 24, 24)  # a border unit's window wraps around the image
    assert assert_rows_match_gradient_support(model, (3, 24, 24), every=5) > 100


class WindowPool(nn.Module):
    """Attention within 4x4 windows, then each window averaged to one position: a coarser grid."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 3, padding=1)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (1, 16, 16, 4)
        windows = x.reshape(1, 4, 4, 4, 4, 4).permute(0, 1, 3, 2, 4, 5).reshape(16, 16, 4)
        mixed = self.attention(windows, windows, windows, need_weights=False)[0]
        return mixed.mean(1).reshape(1, 4, 4, 4).permute(0, 3, 1, 2)  # (1, 4, 4, 4): one position per window


def test_a_window_averaged_to_one_position_is_a_coarser_grid():
    table = receptive_fields(WindowPool(), (1, 16, 16))
    row = table["(output)"]
    assert (row.size, row.stride, row.padding, row.output_shape) == ((6, 6), (4, 4), (1, 1), (4, 4))
    assert_rows_match_gradient_support(WindowPool(), (1, 16, 16))


class SpaceToDepth(nn.Module):
    """``pixel_unshuffle`` written as a view, a permute and a view (TResNet's stem), then a convolution."""

    def __init__(self, kernel: int = 1, transposed: bool = False):
        super().__init__()
        convolution = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = convolution(4, 2, kernel, stride=2 if transposed else 1, padding=kernel // 2)

    def forward(self, x):
        blocks = x.reshape(1, 1, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 4, 4, 4)
        return self.conv(blocks)


@pytest.mark.parametrize(
    ("kernel", "transposed", "size", "stride"),
    [(1, False, 2, 2), (3, False, 6, 2), (3, True, 4, 1)],
    ids=["1x1", "3x3", "transposed"],
)
def test_space_to_depth_by_views_is_exact(kernel, transposed, size, stride):
    """The channels hold each 2x2 block's offsets: the convolution sums them, the blocks are a coarser grid."""
    table = receptive_fields(SpaceToDepth(kernel, transposed), (1, 8, 8))
    assert (table["conv"].size, table["conv"].stride) == ((size, size), (stride, stride))
    assert assert_rows_match_gradient_support(SpaceToDepth(kernel, transposed), (1, 8, 8)) >= 16


class SpaceToDepthSlice(nn.Module):
    """Space-to-depth by views, then channels sliced across the offsets: 4 of 16 (one input channel, every offset),
    or 2 (the even rows): elements no factor of the slice's own describes, followed one by one."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep
        self.encode = nn.Conv2d(1, 4, 3, padding=1)
        self.decode = nn.Conv2d(keep, 2, 3, padding=1)

    def forward(self, x):
        blocks = self.encode(x).reshape(1, 4, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 16, 4, 4)
        return self.decode(blocks[:, : self.keep])


@pytest.mark.parametrize(("keep", "size"), [(4, (8, 8)), (2, (7, 8))], ids=["every-offset", "even-rows"])
def test_a_slice_across_space_to_depth_offsets_is_followed_element_by_element(keep, size):
    table = receptive_fields(SpaceToDepthSlice(keep), (1, 8, 8))
    assert table["decode"].size == size and table["decode"].stride == (2, 2)
    assert assert_rows_match_gradient_support(SpaceToDepthSlice(keep), (1, 8, 8)) == 64 + 16  # encode, decode


class StridedSum(nn.Module):
    """Rows split as (2, 2, 2) and summed over the middle factor: rows {0, 2}, {1, 3}, {4, 6}, {5, 7} pooled."""

    def forward(self, x):
        return x.reshape(1, 1, 2, 2, 2, 8).sum(3)


def test_a_sum_over_a_middle_part_of_a_split_axis_is_named():
    with pytest.raises(UnsupportedLayerError, match=r"aten.sum.* keeps part of a split spatial axis"):
        receptive_fields(StridedSum(), (1, 8, 8))


class Unfolded(nn.Module):
    """TNT's pixel embedding: ``nn.Unfold`` windows as columns, then a linear map and back to a grid."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=3, dilation=2, padding=1, stride=2)
        self.linear = nn.Linear(2 * 9, 4)

    def forward(self, x):
        columns = self.unfold(x)  # (1, 2 * 9, 5 * 5)
        return self.linear(columns.transpose(1, 2)).transpose(1, 2).reshape(1, 4, 5, 5)


def test_unfold_columns_see_their_windows():
    table = receptive_fields(Unfolded(), (2, 12, 12))
    assert (table["unfold"].size, table["unfold"].stride, table["unfold"].padding) == ((5, 5), (2, 2), (1, 1))
    assert_rows_match_gradient_support(Unfolded(), (2, 12, 12))


class MaskUnits(nn.Module):
    """Hiera-like: each axis split three ways (2 x 2 x 2), the innermost parts pooled away, the rest kept split."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        x = self.embed(x).view(1, 2, 2, 2, 2, 2, 2, 2)  # (n, c, h_outer, h_mid, h_inner, w_outer, w_mid, w_inner)
        units = x.permute(0, 1, 4, 7, 2, 5, 3, 6).mean((2, 3))  # (n, c, h_outer, w_outer, h_mid, w_mid)
        grid = units.permute(0, 1, 2, 4, 3, 5).reshape(1, 2, 4, 4)
        return self.head(grid)


def test_pooling_the_innermost_parts_leaves_a_coarser_grid():
    table = receptive_fields(MaskUnits(), (1, 8, 8))
    assert (table["head"].size, table["head"].stride, table["head"].padding) == (
        (8, 8),
        (2, 2),
        (3, 3),
    )  # 3x3, 2x2 pooling, 3x3
    assert_rows_match_gradient_support(MaskUnits(), (1, 8, 8))


class MaskUnitAttention(nn.Module):
    """timm's Hiera attention: within ``units`` mask units (innermost in the tokens), queries max-pooled over
    ``q_stride`` tokens of their unit (outermost in it), keys and values at full resolution."""

    def __init__(self, dim: int, units: int, q_stride: int):
        super().__init__()
        self.units, self.q_stride = units, q_stride
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        n, _, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, -1, self.units, 3, dim).permute(3, 0, 2, 1, 4).unbind(0)
        if self.q_stride > 1:
            q = q.view(n, self.units, self.q_stride, -1, dim).amax(2)
        attention = (q * dim**-0.5 @ k.transpose(-1, -2)).softmax(-1)
        return (attention @ v).transpose(1, 2).reshape(n, -1, dim)


class HieraBlock(nn.Module):
    def __init__(self, dim: int, units: int, q_stride: int = 1):
        super().__init__()
        self.q_stride = q_stride
        self.norm = nn.LayerNorm(dim)  # keeps the random-weight softmax from saturating (exact zero gradients)
        self.attn = MaskUnitAttention(dim, units, q_stride)

    def forward(self, x):
        pooled = x.view(x.shape[0], self.q_stride, -1, x.shape[-1]).amax(1)  # the residual, pooled like q
        return pooled + self.attn(self.norm(x))


class PooledMaskUnits(nn.Module):
    """Hiera in miniature: 8x8 tokens unrolled twice by 2x2 (mask units of 4x4 tokens innermost), attention
    within each unit, then within each unit with its queries pooled 2x2 (4x4 tokens left), then globally.
    The pooled tokens are rolled back to a grid for a convolution."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.unit = HieraBlock(4, units=4)
        self.pooled = HieraBlock(4, units=4, q_stride=4)
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.whole = HieraBlock(4, units=1)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (1, 8, 8, 4)
        for _ in range(2):  # timm's Unroll: each 2x2 stride moved in front of the tokens
            n, h, w, c = x.shape
            x = x.view(n, h // 2, 2, w // 2, 2, c).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        x = self.pooled(self.unit(x.reshape(1, 64, 4)))  # tokens (sy2, sx2, h, w): row 2h + sy2
        grid = x.view(1, 2, 2, 2, 2, 4).permute(0, 5, 3, 1, 4, 2).reshape(1, 4, 4, 4)
        return self.whole(self.head(grid).flatten(2).transpose(1, 2))


def test_mask_unit_attention_with_pooled_queries_stays_in_its_mask_unit():
    """hiera_tiny_224's blocks.1 was called global: queries pooled to a coarser grid than the keys they meet."""
    table = receptive_fields(PooledMaskUnits(), (1, 16, 16))
    first, pooled = table["unit.attn"], table["pooled.attn"]
    assert not pooled.is_global and pooled.output_shape == (4, 4) and pooled.stride == (4, 4)
    assert first.box(0, 0) == pooled.box(0, 0) == (0, 0, 8, 8)  # mask unit 0: tokens 0..3, pixels 0..7
    assert pooled.box(3, 3) == (7, 7, 16, 16)
    assert table["whole.attn"].is_global
    assert assert_rows_match_gradient_support(PooledMaskUnits(), (1, 16, 16)) > 150


def test_token_and_channels_last_rows_have_maps_and_window_rows_do_not():
    """Maps read a ViT's tokens and Swin's channels-last rows as grids; rows laid out as windows have none."""
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=12, mlp_dim=16)
    table = receptive_fields(vit, (3, 32, 32))
    layers = ["encoder.layers.encoder_layer_0.ln_1", "encoder"]
    # One channel: the channel sum of a LayerNorm's output with its initial unit scale is a constant.
    maps = receptive_maps(vit, torch.rand(2, 3, 32, 32), layers, channel=0, table=table)
    local, spread = maps.maps[:, 0], maps.maps[:, 1]
    assert maps.boxes[0, 0].tolist() == [16, 16, 24, 24]  # patch (2, 2) before attention: its own 8x8 pixels
    assert local[:, :16].abs().sum() == 0 and local[:, 16:24, 16:24].abs().sum() > 0
    assert spread[:, :8, :8].abs().sum() > 0  # after attention the centre token reads every patch
    swin = small_swin()
    table = receptive_fields(swin, (3, 24, 24))
    assert table["features.1.0.attn"].tensor_shape == (1, 12, 12, 8) and mappable(table["features.1.0.attn"])
    assert "features.1.0.attn" in all_layers(table)
    window = WindowPool()
    windows = receptive_fields(window, (1, 16, 16))
    assert windows["attention"].tensor_shape == (16, 16, 4) and not mappable(windows["attention"])
    with pytest.raises(ValueError, match=r"'attention' \(MultiheadAttention\) .* not one grid \(windows"):
        resolve_layers(windows, ["attention"])


def test_default_layers_follow_the_blocks_of_an_isotropic_network():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=6, num_heads=2, hidden_dim=12, mlp_dim=16)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in (0, 2, 3, 5)]
    assert default_layers(receptive_fields(vit, (3, 32, 32))) == [*blocks, "encoder"]  # in the order computed
    # Swin's last stage is represented by its LayerNorm, not by the Permute after it, which computes nothing.
    assert default_layers(receptive_fields(small_swin(), (3, 24, 24))) == ["features.1", "norm"]


def test_a_constant_channel_sum_is_named_with_a_hint():
    """After a LayerNorm with its initial unit scale the channels sum to a constant: the map would be noise."""
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=12, mlp_dim=16)
    probes = torch.rand(2, 3, 32, 32)
    with pytest.warns(
        UserWarning, match=r"'encoder.layers.encoder_layer_0.ln_1' does not depend on the input.*channel=k"
    ):
        receptive_maps(vit, probes, ["encoder.layers.encoder_layer_0.ln_1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        receptive_maps(vit, probes, ["encoder.layers.encoder_layer_0.ln_1"], channel=0)
        receptive_maps(vit, probes, ["conv_proj", "encoder.layers.encoder_layer_0"])


# --------------------------------------------------------------------------------------------
# Issue 25: the zoo's last refusals, each on a minimal model of the operation (every unit checked).
# --------------------------------------------------------------------------------------------


class RelativeConvTokens(nn.Module):
    """CoaT's convolutional relative position encoding: a depthwise convolution over the grid of tokens, the class
    token left out, then padded back in front as a zero (``F.pad`` along the tokens)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1)
        grid = tokens[:, 1:].transpose(1, 2).reshape(-1, 4, 4, 4)
        encoded = tokens[:, 1:] * self.conv(grid).flatten(2).transpose(1, 2)
        return self.head(tokens + torch.nn.functional.pad(encoded, (0, 0, 1, 0)))


def test_tokens_padded_in_front_are_class_tokens():
    table = receptive_fields(RelativeConvTokens(), (1, 8, 8))
    assert table["head"].tensor_shape == (1, 17, 4) and table["head"].size == (6, 6)
    assert table["head"].box(0, 0) == (0, 0, 4, 4)
    assert assert_rows_match_gradient_support(RelativeConvTokens(), (1, 8, 8)) == 3 * 16


class Outlook(nn.Module):
    """VOLO's outlook attention: each window's values (``nn.Unfold``) weighted by its position's attention, summed
    back onto the pixels the windows cover (``F.fold``)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride
        self.embed = nn.Conv2d(1, 2, 3, padding=1)
        self.unfold = nn.Unfold(3, padding=1, stride=stride)
        self.pool = nn.AvgPool2d(stride)
        self.attn = nn.Conv2d(2, 81, 1)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        windows = (h // self.stride) * (w // self.stride)
        v = self.unfold(x).reshape(n, c, 9, windows).permute(0, 3, 2, 1)  # (n, windows, 9, c)
        weights = self.attn(self.pool(x)).reshape(n, 9, 9, windows).permute(0, 3, 1, 2).softmax(-1)
        columns = (weights @ v).permute(0, 3, 2, 1).reshape(n, c * 9, windows)
        return torch.nn.functional.fold(columns, (h, w), 3, padding=1, stride=self.stride)


@pytest.mark.parametrize(("stride", "size"), [(1, (7, 7)), (2, (7, 7))])
def test_fold_sums_each_pixel_over_the_windows_that_cover_it(stride, size):
    model = nn.Sequential(Outlook(stride))  # the fold's output is a module's: a row the oracle checks
    table = receptive_fields(model, (1, 8, 8))
    assert table["0"].size == size and table["0"].stride == (1, 1)
    assert assert_rows_match_gradient_support(model, (1, 8, 8)) >= 64 * 2 + 64 // stride**2 * 2


class WindowedDepthwise(nn.Module):
    """EfficientViT's local window attention: 4x4 windows cut out as a batch, a depthwise convolution within each
    (zeros at the windows' edges), attention within each, windows put back."""

    def __init__(self, stride: int):
        super().__init__()
        self.embed = nn.Conv2d(1, 2, 1)
        self.dw = nn.Conv2d(2, 2, 3, stride=stride, padding=1, groups=2)
        self.attention = nn.MultiheadAttention(2, 1, batch_first=True)
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        windows = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, 4, 4)
        y = self.dw(windows)
        s = y.shape[-1]
        tokens = y.flatten(2).transpose(1, 2)
        y = self.attention(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(-1, c, s, s)
        y = y.view(n, h // 4, w // 4, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h // 4 * s, w // 4 * s)
        return self.head(y)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_convolution_within_window_partitions_stops_at_their_edges(stride):
    table = receptive_fields(WindowedDepthwise(stride), (1, 8, 8))
    dw = table["dw"]
    assert not dw.is_global and dw.tensor_shape == (4, 2, 4 // stride, 4 // stride)
    assert table["head"].output_shape == (8 // stride, 8 // stride)
    assert table["head"].box(0, 0) == (0, 0, 4, 4)  # attention within the first window: all of it, never beyond
    assert assert_rows_match_gradient_support(WindowedDepthwise(stride), (1, 8, 8)) >= 64


class Halo(nn.Module):
    """HaloNet's attention: queries in 4x4 blocks, keys and values from the 6x6 windows around them (a halo of 1,
    cut by ``F.pad`` and ``Tensor.unfold``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 1)
        self.q = nn.Conv2d(4, 4, 1)
        self.kv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        blocks = (h // 4) * (w // 4)
        q = self.q(x).reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(n, blocks, 16, c)
        kv = torch.nn.functional.pad(self.kv(x), [1, 1, 1, 1]).unfold(2, 6, 4).unfold(3, 6, 4)
        k, v = kv.reshape(n, 2 * c, blocks, 36).permute(0, 2, 3, 1).split(c, -1)
        out = (q @ k.transpose(-1, -2) * c**-0.5).softmax(-1) @ v  # (n, blocks, 16, c)
        return out.reshape(n, h // 4, w // 4, 4, 4, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def test_halo_attention_sees_its_block_and_the_halo_around_it():
    model = nn.Sequential(Halo())
    table = receptive_fields(model, (1, 8, 8))
    assert table["0"].box(0, 0) == (0, 0, 5, 5) and table["0"].box(7, 7) == (3, 3, 8, 8)
    assert assert_rows_match_gradient_support(model, (1, 8, 8)) == 4 * 64
