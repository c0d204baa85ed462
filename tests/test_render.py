"""layer_grid, layer_image and plot_maps: sizes for a screen, the box where the field is, heat that reads, captions;
1-D strips and 3-D orthogonal slices."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rf_callback.render import (
    BOX_COLOR,
    CARD,
    CURVE,
    FONT_SIZE,
    GAP,
    GREY_RANGE,
    LINE_HEIGHT,
    PADDING,
    _font,
    _legend_height,
    _legend_lines,
    _palette,
    figure_image,
    layer_grid,
    layer_image,
    mean_image,
    plot_maps,
    summary_figure,
    tile_size,
)

CYAN = torch.tensor(BOX_COLOR, dtype=torch.uint8)


def above_legend(image, drawn=True, kind=2):
    """The height of ``image`` (3, H, W) above its legend: probes and captions."""
    return image.shape[1] - _legend_height(image.shape[2], drawn, kind)


def one_probe(box, center=None, side=28, image=None, heat=None, **kwargs):
    """The single panel (3, h, w) of a one-probe grid, without its caption."""
    image = torch.zeros(1, 1, side, side) if image is None else image
    heat = torch.zeros(1, side, side) if heat is None else heat
    if center is None:
        center = ((box[0] + box[2] - 1) / 2, (box[1] + box[3] - 1) / 2)
    grid = layer_grid(image, heat, torch.tensor([box]), torch.tensor([center]), **kwargs)
    h, w = tile_size(side, side, kwargs.get("tile", 128))
    return grid[:, PADDING : PADDING + h, PADDING : PADDING + w]


def cyan(panel):
    """Where ``panel`` (3, h, w) has the box colour: a bool (h, w)."""
    return (panel == CYAN.view(3, 1, 1)).all(0)


@given(st.integers(1, 1000), st.integers(1, 1000), st.integers(8, 256))
def test_a_tile_is_the_probe_scaled_by_an_integer_with_its_long_side_in_half_tile_to_tile(height, width, tile):
    h, w = tile_size(height, width, tile)
    assert tile / 2 < max(h, w) <= tile
    if max(height, width) <= tile:
        factor = h // height
        assert (h, w) == (height * factor, width * factor)
    else:
        factor = -(-max(height, width) // tile)
        assert (h, w) == (-(-height // factor), -(-width // factor))


@pytest.mark.parametrize(("side", "channels", "count", "tile", "columns"), [(224, 3, 10, 112, 4), (28, 1, 6, 112, 3)])
def test_grid_is_uint8_rgb_in_rows_of_tiles_with_captions_and_a_legend(side, channels, count, tile, columns):
    boxes = torch.tensor([[4, 4, 12, 12]]).expand(count, 4)
    grid = layer_grid(
        torch.rand(count, channels, side, side),
        torch.rand(count, side, side),
        boxes,
        torch.full((count, 2), 7.5),
        labels=[f"class {n}" for n in range(count)],
    )
    rows, width = -(-count // columns), columns * (tile + PADDING) + PADDING
    assert grid.dtype == torch.uint8
    height = rows * (tile + LINE_HEIGHT + PADDING) + PADDING + _legend_height(width, True, 2)
    assert grid.shape == (3, height, width)


def test_box_is_drawn_just_outside_the_field_with_ticks_at_its_centre():
    # 28 px at 4x: the field (8, 8, 20, 20) is screen rows/columns 32..79; lines 2 px, ticks 5 px long.
    panel = one_probe((8, 8, 20, 20))
    box = torch.zeros(112, 112, dtype=torch.bool)
    box[30:82, 30:82] = True
    box[32:80, 32:80] = False
    ticks = torch.zeros(112, 112, dtype=torch.bool)
    ticks[25:30, 55:57] = ticks[82:87, 55:57] = ticks[55:57, 25:30] = ticks[55:57, 82:87] = True
    assert torch.equal(cyan(panel), box | ticks)


def test_ticks_follow_the_unit_centre_and_the_box_turns_inward_at_the_image_edge():
    # A field clipped at the top left: its centre (2, 2) is not the middle of the clipped box.
    mask = cyan(one_probe((0, 0, 10, 10), center=(2.0, 2.0)))
    assert mask[0:2, 0:42].all() and mask[0:42, 0:2].all()  # top and left lines inside, at the edge
    assert mask[40:42, 0:42].all() and mask[0:42, 40:42].all()  # bottom and right lines outside the field
    assert mask[2:7, 9:11].all() and mask[9:11, 2:7].all()  # ticks at 4 * 2.5 = 10, turned inward
    assert mask[42:47, 9:11].all() and mask[9:11, 42:47].all()  # ticks outward, below and to the right


def test_large_probes_are_reduced_and_their_boxes_drawn_at_tile_scale():
    heat = torch.zeros(1, 224, 224)
    heat[0, 111, 113] = 1.0
    panel = one_probe((100, 100, 124, 124), side=224, heat=heat)
    assert panel.shape[1:] == (112, 112)
    mask = cyan(panel)
    assert mask[48:50, 48:64].all() and mask[62:64, 48:64].all() and not mask[50:62, 50:62].any()
    assert torch.equal(panel[:, 55, 56], _palette("inferno")[255])  # the peak, averaged with 3 zeros, is still the peak


def test_no_box_or_ticks_where_the_unit_sees_the_whole_image_and_the_caption_says_so():
    flagged = layer_grid(
        torch.rand(2, 1, 28, 28),
        torch.rand(2, 28, 28),
        torch.tensor([[0, 0, 28, 28], [8, 8, 20, 20]]),
        torch.tensor([[13.5, 13.5], [13.5, 13.5]]),
        whole_image=[True, True],
    )
    assert not cyan(flagged).any()  # neither on the probes nor in the legend
    inferred = one_probe((0, 0, 28, 28))
    assert not cyan(inferred).any()
    probe, heat, center = torch.zeros(1, 1, 28, 28), torch.zeros(1, 28, 28), torch.zeros(1, 2)
    plain = layer_grid(probe, heat, torch.tensor([[8, 8, 20, 20]]), center)
    whole = layer_grid(probe, heat, torch.tensor([[0, 0, 28, 28]]), center)
    assert above_legend(whole, drawn=False) == above_legend(plain) + LINE_HEIGHT  # the "whole image" caption


def test_labels_write_under_each_probe_and_change_only_the_caption():
    boxes, centers = torch.tensor([[8, 8, 20, 20]] * 2), torch.full((2, 2), 13.5)
    args = (torch.rand(2, 1, 28, 28), torch.rand(2, 28, 28), boxes, centers)
    bare = layer_grid(*args)
    coat, bag = layer_grid(*args, labels=["Coat", "Coat"]), layer_grid(*args, labels=["Coat", "Bag"])
    assert coat.shape[1] == bare.shape[1] + LINE_HEIGHT
    tile = slice(PADDING, PADDING + 112)
    assert torch.equal(coat[:, tile], bare[:, tile]) and torch.equal(coat[:, tile], bag[:, tile])
    caption = slice(PADDING + 112, PADDING + 112 + LINE_HEIGHT)
    first, second = slice(PADDING, PADDING + 112), slice(2 * PADDING + 112, 2 * PADDING + 224)
    assert torch.equal(coat[:, caption, first], bag[:, caption, first])
    assert not torch.equal(coat[:, caption, second], bag[:, caption, second])
    assert not torch.equal(coat[:, caption, first], coat[:, caption, first].flip(2))  # there is text


def test_heat_reads_on_white_and_on_black_and_the_probe_is_dimmed_grey():
    image = torch.zeros(1, 3, 28, 28)
    image[..., :, 14:] = 1.0  # black left half, white right half
    heat = torch.zeros(1, 28, 28)
    heat[0, 5, 5] = heat[0, 5, 20] = 1.0  # the peak on black and on white
    panel = one_probe((0, 0, 28, 28), image=image, heat=heat)
    top = _palette("inferno")[255]
    assert torch.equal(panel[:, 21, 21], top) and torch.equal(panel[:, 21, 81], top)
    low, high = GREY_RANGE
    assert panel[:, 100, 10].tolist() == [round(low)] * 3 and panel[:, 100, 100].tolist() == [round(high)] * 3
    assert top.float().mean() - high > 50  # the heat's peak is far brighter than the brightest garment


def test_nan_and_zero_maps_draw_the_probe_alone():
    maps = torch.zeros(2, 28, 28)
    maps[1] = float("nan")
    grid = layer_grid(torch.rand(2, 1, 28, 28), maps, torch.tensor([[0, 0, 28, 28]] * 2), torch.zeros(2, 2))
    tiles = grid[:, PADDING : PADDING + 112]
    assert (tiles[0] == tiles[1]).all() and (tiles[1] == tiles[2]).all()  # grey only: no heat anywhere


def test_the_same_inputs_give_the_same_image():
    generator = torch.Generator().manual_seed(0)
    args = (
        torch.rand(10, 3, 64, 64, generator=generator),
        torch.rand(10, 64, 64, generator=generator),
        torch.randint(0, 32, (10, 4), generator=generator).sort(1).values,
        torch.rand(10, 2, generator=generator) * 64,
    )
    assert torch.equal(layer_grid(*args, labels=list("abcdefghij")), layer_grid(*args, labels=list("abcdefghij")))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"maps": torch.zeros(2, 27, 28)}, ValueError, r"maps must be \(2, 28, 28\)"),
        ({"boxes": torch.zeros(2, 2)}, ValueError, r"boxes must be \(2, 4\)"),
        ({"labels": ["a"]}, ValueError, r"labels needs one entry per probe \(2\), got 1"),
        ({"labels": "ab"}, TypeError, "not one string"),
        ({"whole_image": [True]}, ValueError, "whole_image needs one entry per probe"),
        ({"tile": 4}, ValueError, r"tile=4\): an int >= 8"),
    ],
)
def test_arguments_that_disagree_are_named(change, error, message):
    args = {
        "images": torch.zeros(2, 1, 28, 28),
        "maps": torch.zeros(2, 28, 28),
        "boxes": torch.zeros(2, 4),
        "centers": torch.zeros(2, 2),
    }
    args.update(change)
    with pytest.raises(error, match=message):
        layer_grid(**args)


def test_plot_maps_shows_each_layer_grid_pixel_for_pixel_under_its_name():
    images, maps = torch.rand(3, 1, 28, 28), torch.rand(3, 2, 28, 28)
    boxes = torch.tensor([[[10, 10, 18, 18], [0, 0, 28, 28]]]).expand(3, 2, 4)
    centers = torch.full((3, 2, 2), 13.5)
    figure = plot_maps(images, maps, boxes, centers, ["a", "b", "c"], ["conv1", "fc"], tile=128)
    assert [axes.get_title(loc="left") for axes in figure.axes] == ["conv1", "fc"]
    for k, axes in enumerate(figure.axes):
        grid = layer_grid(images, maps[:, k], boxes[:, k], centers[:, k], labels=["a", "b", "c"])
        assert (axes.images[0].get_array() == grid.permute(1, 2, 0).numpy()).all()
    single = plot_maps(images, maps[:, 0], boxes[:, 0], centers[:, 0])
    assert [axes.get_title(loc="left") for axes in single.axes] == ["layer 0"]
    with pytest.raises(ValueError, match=r"one name per layer \(2\), got 1"):
        plot_maps(images, maps, boxes, centers, layer_names=["conv1"])


def test_receptive_maps_plot_draws_the_chosen_layers_and_probes():
    from torch import nn

    from rf_callback import receptive_maps

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    probes = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = receptive_maps(net, probes, "all")
    one = maps.plot(probes, "3", select=[0])
    two = maps.plot(probes, ["0", "3"], select=[0, 2], labels=["a", "b", "c"])
    assert len(one.axes) == 1 and len(two.axes) == 2
    assert [axes.get_title(loc="left") for axes in two.axes] == ["0", "3"]
    with pytest.raises(KeyError, match=r"no maps for \['9'\]"):
        maps.plot(probes, "9")


# ---- 1-D signals and 3-D volumes ---------------------------------------------------------------------------
def signal_panel(box, length=64, heat=None, signal=None, tile=32, **kwargs):
    """The single strip (3, h, w) of a one-probe 1-D picture, without its caption."""
    signal = torch.zeros(1, 1, length) if signal is None else signal
    heat = torch.zeros(1, length) if heat is None else heat
    center = torch.tensor([[(box[0] + box[1] - 1) / 2]])
    grid = layer_image(signal, heat, torch.tensor([box]), center, tile=tile, **kwargs)
    return grid, grid[:, PADDING : PADDING + max(32, tile // 2), PADDING : PADDING + 3 * tile // length * length]


def test_a_signal_is_a_strip_with_its_field_shaded_and_the_curve_on_top():
    heat = torch.zeros(1, 64)
    heat[0, 40] = 1.0  # the peak
    heat[0, 44] = 0.5
    signal = torch.linspace(0, 1, 64).view(1, 1, 64)  # a ramp: its line climbs from bottom left to top right
    _, panel = signal_panel((32, 48), heat=heat, signal=signal)
    assert panel.shape == (3, 32, 64)  # 3 * 32 px at one column per sample; strips at least 32 px high
    tinted = (panel[2] > panel[0] + 20).any(0)  # cyan shading lifts blue and green over red
    assert tinted.nonzero().flatten().tolist() == list(range(32, 48))
    curve = _palette("inferno")[CURVE].view(3, 1)
    column = (panel[:, :, 40] == curve).all(0).nonzero().flatten()
    half = (panel[:, :, 44] == curve).all(0).nonzero().flatten()
    assert column.min() <= 4 and 14 <= half.min() <= 17  # the peak reaches the top, half of it half-way
    _, bare = signal_panel((32, 48), signal=signal)
    assert torch.equal(panel[:, 10, 44], bare[:, 10, 44]) and not torch.equal(panel[:, 24, 44], bare[:, 24, 44])
    grey = (panel == 200).all(0)
    assert grey[:, 0].nonzero().max() > 24 and grey[:, 63].nonzero().min() < 8  # the ramp, low to high


def test_whole_signals_and_layers_without_a_field_draw_no_interval_and_say_why():
    plain, _ = signal_panel((32, 48))
    whole, panel = signal_panel((0, 64))
    assert not cyan(panel).any() and above_legend(whole, False, 1) == above_legend(plain, True, 1) + LINE_HEIGHT
    flagged, panel = signal_panel((32, 48), analytic=False)  # "no analytic RF" under it
    assert not cyan(flagged).any() and above_legend(flagged, False, 1) == above_legend(plain, True, 1) + LINE_HEIGHT


def test_a_volume_is_three_orthogonal_slices_each_with_its_section_of_the_box():
    volume = torch.rand(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    heat = torch.zeros(1, 4, 8, 8)
    heat[0, 2, 3, 5] = 1.0
    box, center = (1, 2, 4, 3, 5, 7), (2.0, 3.0, 5.0)  # depth 1..3, rows 2..5, columns 4..7
    grid = layer_image(volume, heat, torch.tensor([box]), torch.tensor([center]), tile=32)
    # At 4x: axial 32x32 top left, sagittal (rows x depth) 32x16 on its right, coronal (depth x columns) below,
    # in the middle of a column widened for the caption "z 2, y 3, x 5".
    left = PADDING + (grid.shape[2] - 2 * PADDING - (32 + PADDING + 16)) // 2
    axial = grid[:, PADDING : PADDING + 32, left : left + 32]
    sagittal = grid[:, PADDING : PADDING + 32, left + PADDING + 32 : left + PADDING + 48]
    coronal = grid[:, 2 * PADDING + 32 : 2 * PADDING + 48, left : left + 32]
    for view, section, middle in [
        (axial, (2, 4, 5, 7), (3.0, 5.0)),
        (sagittal, (2, 1, 5, 3), (3.0, 2.0)),
        (coronal, (1, 4, 3, 7), (2.0, 5.0)),
    ]:
        size = tuple(view.shape[1:])
        slice_ = torch.zeros(1, 1, size[0] // 4, size[1] // 4)
        alone = layer_grid(
            slice_, torch.zeros(1, *slice_.shape[2:]), torch.tensor([section]), torch.tensor([middle]), tile=32
        )
        expected = alone[:, PADDING : PADDING + size[0], PADDING : PADDING + size[1]]
        assert torch.equal(cyan(view), cyan(expected))  # the same box and ticks a 2-D slice would get
    top = _palette("inferno")[255]
    assert torch.equal(axial[:, 3 * 4 + 1, 5 * 4 + 1], top) and torch.equal(sagittal[:, 13, 9], top)
    assert torch.equal(coronal[:, 9, 21], top)  # the peak voxel (2, 3, 5) in all three slices through it


def test_mean_image_draws_the_map_alone_with_the_box_or_says_the_units_differ():
    mean = torch.zeros(28, 28)
    mean[14, 14] = 1.0
    boxed = mean_image(mean, torch.tensor([8, 8, 20, 20]), torch.tensor([13.5, 13.5]), probes=10)
    loose = mean_image(mean, None, torch.tensor([14.0, 14.0]), probes=10)
    assert cyan(boxed).any() and not cyan(loose).any()
    assert above_legend(loose, drawn=False) == above_legend(boxed) + LINE_HEIGHT  # "units differ" under "mean of ..."
    for signal in (
        mean_image(torch.rand(50), None, torch.tensor([25.0]), probes=3),
        mean_image(torch.rand(4, 8, 8), torch.tensor([0, 2, 2, 4, 6, 6]), torch.full((3,), 3.0), probes=3),
    ):
        assert signal.dtype == torch.uint8 and signal.shape[0] == 3


def test_layer_image_draws_images_as_layer_grid_does_and_refuses_other_shapes():
    args = (
        torch.rand(3, 1, 28, 28),
        torch.rand(3, 28, 28),
        torch.tensor([[8, 8, 20, 20]] * 3),
        torch.full((3, 2), 13.5),
    )
    assert torch.equal(layer_image(*args, labels=["a", "b", "c"]), layer_grid(*args, labels=["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"images must be \(N, C, L\), \(N, C, H, W\) or \(N, C, D, H, W\)"):
        layer_image(torch.rand(1, 1, 2, 2, 2, 2), torch.rand(1, 2, 2, 2, 2), torch.zeros(1, 8), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"boxes must be \(2, 2\)"):
        layer_image(torch.rand(2, 1, 30), torch.rand(2, 30), torch.zeros(2, 4), torch.zeros(2, 1))


@pytest.mark.parametrize("shape", [(2, 1, 40), (2, 1, 4, 12, 12)], ids=["1-D", "3-D"])
def test_plot_maps_and_receptive_maps_plot_take_any_dimension(shape):
    from torch import nn

    from rf_callback import receptive_maps

    conv = nn.Conv1d if len(shape) == 3 else nn.Conv3d
    net = nn.Sequential(conv(1, 2, 3, padding=1), nn.ReLU(), conv(2, 2, 3, stride=2))
    probes = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    maps = receptive_maps(net, probes, ["0", "2"])
    figure = maps.plot(probes, labels=["a", "b"], tile=128)
    assert [axes.get_title(loc="left") for axes in figure.axes] == ["0", "2"]
    for k, axes in enumerate(figure.axes):
        expected = layer_image(probes, maps.maps[:, k], maps.boxes[:, k], maps.centers[:, k], labels=["a", "b"])
        assert (axes.images[0].get_array() == expected.permute(1, 2, 0).numpy()).all()
    single = plot_maps(probes, maps.maps[:, 0], maps.boxes[:, 0], maps.centers[:, 0])
    assert len(single.axes) == 1


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def shown(image):
    """The scale TensorBoard shows ``image`` at by default: the Time Series tab fits it into CARD (it enlarges
    or shrinks it to touch the nearer edge), the Images tab makes it 350 px wide. Both, as (time series, images)."""
    height, width = image.shape[1:]
    return min(CARD[0] / height, CARD[1] / width), 350 / width


@pytest.mark.parametrize("side", [28, 224])
def test_a_layer_laid_out_for_a_tensorboard_card_is_shown_at_its_own_size_with_its_text_whole(side):
    count = len(FASHION)
    args = (torch.rand(count, 1, side, side), torch.rand(count, side, side))
    boxes, centers = torch.tensor([[4, 4, 20, 20]]).expand(count, 4), torch.full((count, 2), 11.5)
    picture = layer_image(*args, boxes, centers, labels=FASHION, fit=CARD)
    tabs = shown(picture)
    assert picture.shape[2] == CARD[1] and 1.0 <= min(tabs) and max(tabs) < 1.1  # text at the size it was drawn
    # Two rows of five probes of 56 px (28 at 2x, 224 at 1/4), each column as wide as its longest class name:
    # the columns are what lies between the grey that runs from the top of the picture to its legend.
    above = picture[:, : above_legend(picture)]
    gap = (above == GAP).all(0).all(0).tolist()
    columns = [len(run) for run in "".join(" " if g else "x" for g in gap).split()]
    assert len(columns) == 5 and min(columns) >= _font(FONT_SIZE).getlength("Ankle boot") + 2
    assert above.shape[1] == 2 * (56 + LINE_HEIGHT + PADDING) + PADDING
    mean = mean_image(args[1].mean(0), boxes[0], centers[0], probes=count, fit=CARD)
    assert mean.shape[2] == picture.shape[2] and shown(mean) == (1.0, tabs[1])  # the same scale as the probes
    assert mean.shape[1] - _legend_height(CARD[1], True, 2) >= 112 + LINE_HEIGHT  # the map 4x, its caption


def test_a_layer_with_more_probes_than_a_card_holds_is_shrunk_as_little_as_its_probes_allow():
    count = 32
    picture = layer_image(torch.rand(count, 1, 28, 28), torch.rand(count, 28, 28), torch.zeros(count, 4),
                          torch.zeros(count, 2), fit=CARD)  # fmt: skip
    assert picture.shape[2] == CARD[1]  # no wider than the card: the Images tab does not shrink it
    assert shown(picture)[0] > 0.5


@pytest.mark.parametrize("width", [458, 320, 200])
def test_the_legend_explains_every_mark_in_whole_words_on_as_many_lines_as_it_needs(width):
    lines = _legend_lines(width, True, 2)
    assert [text for line in lines for _, text, _ in line] == [
        "peak |d unit / d input|",
        "receptive field, ticks at its centre",
    ]
    assert len(lines) == (1 if width == 458 else 2)
    signal = [[text for _, text, _ in line] for line in _legend_lines(width, True, 1)]
    probe, curve, field = "probe", "|d unit / d input|, 0 to its peak", "receptive field, tick at its centre"
    assert (
        signal
        == {458: [[probe, curve, field]], 320: [[probe, curve], [field]], 200: [[probe], [curve], [field]]}[width]
    )


def test_the_summary_chart_fits_a_tensorboard_card_with_its_layer_names_level():
    records = [{"name": f"features.block{k}.relu", "size": (2 * k + 3,) * 2, "stride": (2**k,) * 2} for k in range(6)]
    figure = summary_figure(records)
    image = figure_image(figure)
    assert image.shape[2] == CARD[1] and image.shape[1] <= CARD[0]
    names = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert names == [r["name"] for r in records]
    assert all(label.get_rotation() == 0 for label in figure.axes[0].get_yticklabels())
    assert figure.axes[1].get_yticklabels()[5].get_text() == "13 px, stride 32"


def test_plot_maps_fills_a_notebook_row():
    maps, boxes, centers = torch.rand(2, 1, 224, 224), torch.zeros(2, 1, 4), torch.full((2, 1, 2), 111.5)
    figure = plot_maps(torch.rand(2, 3, 224, 224), maps, boxes, centers)
    assert figure.bbox.width == 2 * (224 + PADDING) + PADDING  # the probes at their own size, not halved
    small = plot_maps(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.zeros(4, 1, 4), torch.zeros(4, 1, 2))
    assert 800 < small.bbox.width <= 960  # 28 px at 8x, four in a row
