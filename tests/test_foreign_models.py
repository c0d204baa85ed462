"""Quiet zeros and odd defaults found on models nobody here wrote (issue 22): HF PVT, EfficientNet, Mask2Former.

* A map of a layer whose channel sum does not depend on the input is rounding noise: a warning says so.
* Default layers are modules that compute something: never a padding, a dropout or an identity.
"""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from rf_callback import TraceError, receptive_fields, receptive_maps
from rf_callback.selection import default_layers

NOISE = "does not depend on the input"


def our_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "receptive_maps" in str(w.message)]


class NormalizedTokens(nn.Module):
    """A patch embedding: a strided convolution, a LayerNorm over the channels (unit scale), then, optionally, a
    position embedding (HF PVT's patch embeddings)."""

    def __init__(self, positions: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.position = nn.Parameter(torch.randn(1, 8, 4, 4)) if positions else None

    def forward(self, x):
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.position if self.position is not None else x


@pytest.mark.parametrize("positions", [False, True])
def test_a_channel_sum_that_does_not_depend_on_the_input_is_named(positions):
    """The same for every probe at each position: constant everywhere, or one constant per position."""
    model = NormalizedTokens(positions)
    probes = torch.rand(3, 3, 16, 16)
    layer = "(output)" if positions else "norm"
    found = our_warnings(lambda: receptive_maps(model, probes, [layer]))
    assert found and NOISE in found[0] and "channel=k" in found[0]
    assert not our_warnings(lambda: receptive_maps(model, probes, ["conv"]))
    assert not our_warnings(lambda: receptive_maps(model, probes, [layer], channel=2))


def test_one_probe_falls_back_to_the_same_sum_at_every_position():
    model = NormalizedTokens(positions=False)
    assert NOISE in our_warnings(lambda: receptive_maps(model, torch.rand(1, 3, 16, 16), ["norm"]))[0]


def test_no_false_alarm_on_convolutions_global_context_or_identical_probes():
    """A convolution's sum depends on the input; a broadcast global pool's is the same at every position but not
    for every probe; probes all alike prove nothing."""

    class Context(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x)).expand(-1, -1, *x.shape[2:]) + 0

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), Context())
    for probes in (torch.rand(4, 3, 16, 16), torch.rand(1, 3, 16, 16)):
        assert not our_warnings(lambda probes=probes: receptive_maps(net, probes, ["0", "2"], unit="max"))
    assert not our_warnings(lambda: receptive_maps(net, torch.rand(4, 3, 16, 16), ["3"]))
    alike = torch.rand(1, 3, 16, 16).expand(3, -1, -1, -1)
    assert not our_warnings(lambda: receptive_maps(NormalizedTokens(positions=True), alike, ["(output)"]))


def test_hugging_face_pvt_patch_embeddings_are_named():
    transformers = pytest.importorskip("transformers")
    config = transformers.PvtConfig(
        image_size=32, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1]
    )
    model = transformers.PvtModel(config)
    found = our_warnings(lambda: receptive_maps(model, torch.rand(2, 3, 32, 32), ["encoder.patch_embeddings.0"]))
    assert "'encoder.patch_embeddings.0' does not depend on the input" in found[0]


# --------------------------------------------------------------------------------------------
# Default layers: modules that do a stage's work
# --------------------------------------------------------------------------------------------


class PaddedStages(nn.Module):
    """Explicit ``ZeroPad2d`` before each strided convolution, dropout between stages (TF-ported networks)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.pad1, self.conv1, self.drop1 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2), nn.Dropout()
        self.pad2, self.conv2, self.drop2 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2), nn.Dropout()
        self.pad3, self.conv3 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Sequential(nn.Identity(), nn.Flatten())

    def forward(self, x):
        x = self.drop1(self.conv1(self.pad1(self.conv0(x))))
        x = self.drop2(self.conv2(self.pad2(x)))
        return self.head(self.conv3(self.pad3(x)))


def test_default_layers_are_modules_that_compute():
    table = receptive_fields(PaddedStages(), (3, 32, 32))
    assert default_layers(table) == ["conv0", "conv1", "conv2", "conv3"]
    assert {"pad1", "drop1", "pad2", "drop2", "pad3", "head", "head.0", "head.1"} <= table.relays
    assert not {"conv0", "conv1", "conv2", "conv3"} & table.relays
    assert table.filter(types=["ZeroPad2d"]).relays == {"pad1", "pad2", "pad3"}


def test_in_place_activations_compute():
    """An in-place ReLU returns the tensor it was given, changed: it is no relay, and stays a stage's layer."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Identity(), nn.Dropout(), nn.MaxPool2d(2))
    table = receptive_fields(net, (1, 16, 16))
    assert table.relays == {"2", "3"}
    assert default_layers(table) == ["1", "4"]


def test_hugging_face_efficientnet_defaults_hold_no_padding():
    transformers = pytest.importorskip("transformers")
    config = transformers.EfficientNetConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320
    )
    table = receptive_fields(transformers.EfficientNetModel(config), (3, 64, 64))
    chosen = default_layers(table)
    # one layer per stage, and the two sides of the border at 64 px (issue 24) among them
    assert sorted({table[key].output_shape for key in chosen}, reverse=True) == [
        (32, 32),
        (16, 16),
        (8, 8),
        (4, 4),
        (2, 2),
    ]
    assert not [key for key in chosen if table[key].module_type in ("ZeroPad2d", "Dropout", "Identity")]
    assert all(key in table.relays for key in table if table[key].module_type == "ZeroPad2d")


# --------------------------------------------------------------------------------------------
# Words: what tables say, what each statistic is relative to; plots without the probes again
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "words"), [(1, "whole signal"), (2, "whole image"), (3, "whole volume")], ids=["1d", "2d", "3d"]
)
def test_global_rows_name_the_whole_input_by_its_dimension(dims, words):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    table = receptive_fields(nn.Sequential(conv(1, 2, 3), pool(1)), (1, *(8,) * dims))
    lines = str(table).split("\n\n")[0].splitlines()[1:]  # RF size, RF min-max; the whole input in words
    assert [line.split()[3:5] for line in lines] == [["3", "3"], words.split()]


def test_mass_fraction_is_relative_to_how_far_the_field_reaches():
    """A corner unit's box is cut by the image, its centre is not: the cube around the centre that holds 95% of a
    flat map is wider than the box (1.8 times its side here); relative to the cube that holds the box, it is 1."""
    from rf_callback.erf import erf_stats

    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 0, :5, :5] = 1.0  # a corner unit's field, cut at the border: its centre is pixel (0, 0)
    maps[0, 1, 4:9, 4:9] = 1.0  # an interior unit's: centred on (6, 6)
    boxes = torch.tensor([[[0, 0, 5, 5], [4, 4, 9, 9]]])
    stats = erf_stats(maps, boxes, torch.tensor([[[0.0, 0.0], [6.0, 6.0]]]), mass=1.0)
    assert stats.mass_side.tolist() == [[9.0, 5.0]] and stats.rf_side.tolist() == [[5.0, 5.0]]
    assert stats.mass_fraction.tolist() == [[1.0, 1.0]]
    assert stats.size_fraction.tolist() == [[1.0, 1.0]]


def test_fractions_stay_within_one_on_real_maps():
    """Every unit of a small network, border ones included: both fractions are in [0, 1]."""
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.Conv2d(4, 4, 5, stride=2, padding=2), nn.Conv2d(4, 4, 7))
    table = receptive_fields(net, (1, 20, 20))
    probes = torch.rand(2, 1, 20, 20)
    for unit in [(0, 0), (3, 3), (0, 3), (1, 2)]:
        stats = receptive_maps(net, probes, ["0", "1", "2"], unit=unit, table=table).erf
        assert (stats.mass_fraction <= 1).all() and (stats.size_fraction <= 1).all() and (stats.mass_fraction > 0).all()


def test_every_statistic_says_what_it_is_relative_to():
    from rf_callback.monitor import STATISTICS

    descriptions = {name: text for name, (_, text) in STATISTICS.items()}
    assert "peak" in descriptions["erf_size"] and "total saliency" in descriptions["erf_mass_side"]
    assert all("relative to" in descriptions[name] for name in ("erf_size_fraction", "erf_mass_fraction"))
    assert "probes" in descriptions["dead_fraction"]
    assert all("Share of the input" in text for name, text in descriptions.items() if "mean_area" in name)


def test_maps_plot_without_the_probes_again():
    probes = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    maps = receptive_maps(net, probes, "all")
    probes.zero_()  # the caller's tensor may change: the maps kept their own copy
    again = receptive_maps(net, torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), "all")
    pictures = [
        maps.plot(layer="3", select=[0, 2]),
        maps.plot(layers="3", select=[0, 2]),
        again.plot(again.probes, "3", select=[0, 2]),  # the probes passed, as before
    ]
    arrays = [figure.axes[0].images[0].get_array() for figure in pictures]
    assert (arrays[0] == arrays[2]).all() and (arrays[1] == arrays[2]).all()
    with pytest.raises(TypeError, match="not both"):
        maps.plot(layer="3", layers=["0"])
    with pytest.raises(ValueError, match="hold no probes"):
        dataclasses.replace(maps, probes=None).plot(layer="3")


def test_batch_norm_statistics_that_do_not_fit_are_refused_as_the_real_forward_refuses_them():
    """HF EfficientNet built with a width factor but its default ``hidden_dim`` has a BatchNorm of 2560 channels
    after a convolution giving 640: the real forward fails, and so must the trace (the fast path skipped the check).
    """
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(4))
    with pytest.raises(TraceError, match="running_mean should contain 8 elements not 4"):
        receptive_fields(net, (1, 8, 8))
