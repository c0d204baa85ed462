"""The receptive-field algebra, checked against a brute-force 1-D oracle and its own laws (no torch)."""

import math
import subprocess
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rf_callback.algebra import (
    IDENTITY,
    AxisRF,
    Field,
    MisalignedBranchesError,
    OnlyHolesError,
    _window,
    compose,
    extreme_paths,
    layer,
    merge,
    within,
)

rfs = st.builds(AxisRF, size=st.integers(1, 50), jump=st.integers(1, 8), start=st.integers(-30, 30))
# (kernel, stride, padding before, padding after, dilation, ceil_mode)
layers = st.tuples(
    st.integers(1, 5), st.integers(1, 3), st.integers(0, 3), st.integers(0, 3), st.integers(1, 3), st.booleans()
)


def out_length(n: int, kernel: int, stride: int, before: int, after: int, dilation: int, ceil: bool) -> int:
    """PyTorch's output length of a sliding window (convolution / pooling)."""
    span = n + before + after - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    if not ceil:
        return span // stride + 1
    length = math.ceil(span / stride) + 1
    if (length - 1) * stride >= n + before:  # the last window must start inside the input or left padding
        length -= 1
    return length


def oracle(n: int, stack) -> list[set[int]]:
    """Input positions each final unit depends on, by enumerating every window."""
    seen = [{i} for i in range(n)]
    for kernel, stride, before, after, dilation, ceil in stack:
        length = out_length(len(seen), kernel, stride, before, after, dilation, ceil)
        seen = [
            set().union(*(seen[v] for j in range(kernel) if 0 <= (v := u * stride + j * dilation - before) < len(seen)))
            for u in range(length)
        ]
    return seen


def field_of(n: int, stack) -> tuple[Field, int]:
    field = Field.of_input((n,))
    for kernel, stride, before, after, dilation, ceil in stack:
        n = out_length(n, kernel, stride, before, after, dilation, ceil)
        field = field.window(0, kernel, stride, before, n, dilation)
    return field, n


def boxes(field: Field, length: int) -> list:
    return [None if (box := field.box((u,))) is None else box[0] for u in range(length)]


def hull(positions: set[int]) -> tuple[int, int] | None:
    return (min(positions), max(positions) + 1) if positions else None


def test_the_algebra_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import rf_callback.algebra, rf_callback"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_padding_moves_the_field_and_never_sizes_it():
    """3x3 pad 1, 3x3 pad 1, 5x5 pad 2: RF 9. The tutorial recurrence gives 1."""
    stack = [(3, 1, 1), (3, 1, 1), (5, 1, 2)]
    rf = IDENTITY
    for kernel, stride, padding in stack:
        rf = compose(rf, layer(kernel, stride, padding))
    assert rf == AxisRF(size=9, jump=1, start=-4)

    wrong = 1  # rf_{l+1} = (rf_l - 1) * s_l + k_l - 2 p_l, as copied around the web
    for kernel, stride, padding in stack:
        wrong = (wrong - 1) * stride + kernel - 2 * padding
    assert wrong == 1


@given(rfs)
def test_identity_is_neutral(rf):
    assert compose(IDENTITY, rf) == rf == compose(rf, IDENTITY)


@given(rfs, rfs, rfs)
def test_composition_is_associative(a, b, c):
    assert compose(compose(a, b), c) == compose(a, compose(b, c))


@given(rfs, st.integers(0, 100))
def test_next_unit_is_shifted_by_the_stride(rf, index):
    low, high = rf.interval(index)
    assert rf.interval(index + 1) == (low + rf.jump, high + rf.jump)
    assert rf.center(index) == (low + high - 1) / 2


@given(st.integers(1, 7), st.integers(1, 4), st.integers(0, 5), st.integers(1, 5))
def test_a_dilated_kernel_equals_its_effective_kernel(kernel, stride, padding, dilation):
    assert layer(kernel, stride, padding, dilation) == layer(dilation * (kernel - 1) + 1, stride, padding)


@given(st.integers(1, 40), st.lists(layers, min_size=1, max_size=6))
def test_against_a_brute_force_oracle(n, stack):
    field, length = field_of(n, stack)
    truth = oracle(n, stack)
    assume(length >= 1)
    assert len(truth) == length
    size, product, padding = 1, 1, 0
    for kernel, stride, before, _, dilation, _ in stack:
        size += dilation * (kernel - 1) * product
        padding += before * product
        product *= stride
    assert field.rfs == (AxisRF(size=size, jump=product, start=-padding),)  # Distill's closed forms
    for u, box in enumerate(boxes(field, length)):
        low, high = field.rfs[0].interval(u)
        assert truth[u] <= set(range(low, high))  # the analytic interval holds every dependency
        assert box == hull(truth[u])  # and the box is exactly their hull


@given(st.integers(4, 40), st.lists(layers, max_size=4), st.integers(0, 2), st.integers(1, 2))
def test_residual_merge_against_the_oracle(n, stack, radius, dilation):
    """x + f(x) where f is a 'same' convolution: each unit sees the union of both branches."""
    trunk, length = field_of(n, stack)
    assume(length >= 1)
    same = (2 * radius + 1, 1, dilation * radius, dilation * radius, dilation, False)
    branch, _ = field_of(n, [*stack, same])
    merged = merge([trunk, branch])
    truth_trunk, truth_branch = oracle(n, stack), oracle(n, [*stack, same])
    assert boxes(merged, length) == [hull(a | b) for a, b in zip(truth_trunk, truth_branch)]


@given(st.integers(4, 24), st.integers(0, 2), st.lists(layers, min_size=1, max_size=4))
def test_windows_on_equal_axes_equal_one_window_at_a_time(n, extra, stack):
    """``Field.windows`` (an axis holding another's very boxes reuses its result) gives the field of windowing
    each axis in turn: square and not, through residual merges, and the boxes match the 1-D oracle."""
    shape = (n, n + extra)
    together, apart = Field.of_input(shape), Field.of_input(shape)
    lengths = list(shape)
    for kernel, stride, before, after, dilation, ceil in stack:
        lengths = [out_length(m, kernel, stride, before, after, dilation, ceil) for m in lengths]
        assume(min(lengths) >= 1)
        windows = [(axis, kernel, stride, before, lengths[axis], dilation) for axis in range(2)]
        together, apart = together.windows(windows), apart.window(*windows[0]).window(*windows[1])
        if kernel % 2 and before == after == dilation * (kernel // 2) and stride == 1:  # 'same': add it to the trunk
            skip = (kernel, 1, before, before, dilation, False)
            together = merge([together, together.windows([(a, *skip[:3], lengths[a], dilation) for a in range(2)])])
            apart = merge(
                [apart, apart.window(0, *skip[:3], lengths[0], dilation).window(1, *skip[:3], lengths[1], dilation)]
            )
    assert together == apart
    truth = oracle(n, stack)
    if not extra and all(k % 2 == 0 or not (b == a == d * (k // 2) and s == 1) for k, s, b, a, d, _ in stack):
        assert [together.box((u, u)) for u in range(lengths[0])] == [
            None if not seen else (hull(seen), hull(seen)) for seen in truth
        ]


@given(st.integers(2, 12), st.integers(0, 4), st.integers(0, 4), st.sampled_from(["reflect", "replicate", "circular"]))
def test_padding_modes_against_the_oracle(n, before, after, mode):
    """Reflect, replicate and circular padding copy real pixels: the boxes follow the copies."""
    assume(mode != "reflect" or max(before, after) < n)
    length = n + before + after - 2
    field = Field.of_input((n,)).pad(0, before, n + before + after, mode).window(0, 3, 1, 0, length)
    padded = [(v if 0 <= v < n else None) for v in range(-before, n + after)]
    if mode == "replicate":
        padded = [min(max(v, 0), n - 1) for v in range(-before, n + after)]
    elif mode == "circular":
        padded = [v % n for v in range(-before, n + after)]
    elif mode == "reflect":
        padded = [-v if v < 0 else 2 * (n - 1) - v if v >= n else v for v in range(-before, n + after)]
    assert boxes(field, length) == [hull({padded[u], padded[u + 1], padded[u + 2]}) for u in range(length)]
    assert field.rfs == (AxisRF(size=3, jump=1, start=-before),)


intervals = st.tuples(st.integers(-5, 30), st.integers(1, 8)).map(lambda t: (t[0], t[0] + t[1]))


@given(
    st.lists(st.one_of(st.none(), intervals), max_size=20),
    st.booleans(),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(-3, 6),
    st.integers(0, 16),
    st.integers(1, 3),
)
def test_window_boxes_are_the_unions_of_the_boxes_read(boxes, monotone, kernel, stride, padding, length, dilation):
    """The window's C-speed path for monotone boxes (slices) agrees with its definition, and so does the general one."""
    if monotone:  # both ends non-decreasing, as after any stack of windows
        lows = sorted(low for low, _ in filter(None, boxes))
        highs = sorted(high for _, high in filter(None, boxes))
        boxes = [(low, max(high, low + 1)) for low, high in zip(lows, highs)]
    expected = []
    for u in range(length):
        read = [boxes[v] for j in range(kernel) if 0 <= (v := u * stride - padding + j * dilation) < len(boxes)]
        read = [box for box in read if box is not None]
        expected.append((min(low for low, _ in read), max(high for _, high in read)) if read else None)
    assert _window(tuple(boxes), kernel, stride, padding, length, dilation) == tuple(expected)


def test_misaligned_branches_raise_and_name_the_merge():
    strided = Field.of_input((16,)).window(0, kernel=3, stride=2, padding=1, length=8)
    cropped = Field.of_input((16,)).take(0, start=4, step=1, length=8)
    with pytest.raises(MisalignedBranchesError, match=r"block3\.add .*different effective strides \(2, 1\)"):
        merge([strided, cropped], where="block3.add")


def test_a_global_branch_that_covers_the_local_one_makes_it_global():
    local = Field.of_input((8,)).window(0, kernel=3, stride=1, padding=1, length=8)
    everything = local.mix(0)
    assert merge([local, everything]).rfs == (AxisRF(size=10, jump=0, start=-1),)


def test_a_global_branch_that_misses_part_of_the_local_one_is_added_per_position():
    """MViT v2: keys pooled with stride 4 never read the last rows; each query sees its own and all the keys'."""
    local = Field.of_input((8,)).window(0, kernel=3, stride=1, padding=1, length=8)
    corner = Field.of_input((8,)).take(0, start=0, step=1, length=1).broadcast(0, 8)  # sees pixel 0 only
    merged = merge([local, corner])
    assert [merged.box((u,)) for u in range(8)] == [((0, 2),), ((0, 3),)] + [((0, u + 2),) for u in range(2, 7)] + [
        ((0, 8),)
    ]
    assert merged.rfs[0].jump == 1 and merged.rfs[0].period == 8


def test_a_branch_that_sees_only_padding_adds_nothing():
    """Concatenating a 1x3 and a 3x1 branch under a padded bottom row: the bottom-right unit sees one
    pixel through the 3x1 branch; the 1x3 branch reads only the padded row and adds no columns."""
    image = Field.of_input((5, 5)).pad(0, before=0, length=6)  # F.pad(x, (0, 0, 0, 1))
    wide = image.window(0, 1, 1, 0, 6).window(1, 3, 1, 1, 5)
    tall = image.window(0, 3, 1, 1, 6).window(1, 1, 1, 0, 5)
    assert merge([wide, tall]).box((5, 4)) == ((4, 5), (4, 5))
    assert merge([wide, tall]).box((2, 2)) == ((1, 4), (1, 4))


def test_layer_validates_its_arguments():
    with pytest.raises(ValueError, match="kernel, stride and dilation >= 1"):
        layer(kernel=0)
    with pytest.raises(ValueError, match="size >= 1 and jump >= 0"):
        AxisRF(size=0)


# (kind, a, b, c): a window (kernel, stride, padding), nearest upsampling by a, or a transposed convolution
resamplers = st.one_of(
    st.tuples(st.just("window"), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2)),
    st.tuples(st.just("nearest"), st.integers(2, 4), st.just(0), st.just(0)),
    st.tuples(st.just("transposed"), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2)),
)


def reads(n: int, step: tuple) -> list[list[int]]:
    """The input positions each output position of ``step`` reads (of ``n``), by enumeration."""
    kind, a, b, c = step
    if kind == "window":
        length = (n + 2 * c - a) // b + 1
        return [[v for j in range(a) if 0 <= (v := u * b - c + j) < n] for u in range(max(length, 0))]
    if kind == "nearest":
        return [[u // a] for u in range(n * a)]
    length = (n - 1) * b - 2 * c + a
    return [[i for i in range(n) for j in range(a) if i * b - c + j == o] for o in range(max(length, 0))]


@given(st.integers(1, 30), st.lists(resamplers, min_size=1, max_size=5))
def test_upsampling_against_a_brute_force_oracle(n, stack):
    """Boxes are the hulls of the true dependencies; the periodic geometry holds every unit's dependencies."""
    field, seen = Field.of_input((n,)), [{i} for i in range(n)]
    for step in stack:
        sources = reads(len(seen), step)
        assume(1 <= len(sources) <= 120 and any(sources))
        seen = [set().union(*(seen[v] for v in s)) for s in sources]
        try:
            if step[0] == "window":
                field = field.window(0, step[1], step[2], step[3], len(sources))
            else:
                field = field.resample(0, sources)
        except OnlyHolesError:  # every unit reads only holes of an earlier upsampling
            assert not any(seen)
            return
    rf = field.rfs[0]
    for u, truth in enumerate(seen):
        assert boxes(field, len(seen))[u] == hull(truth)
        interval = rf.interval(u)
        assert not truth or (interval is not None and truth <= set(range(*interval)))
    assert rf.size == max(high - low for low, high in filter(None, map(rf.interval, range(rf.period))))


@given(st.lists(resamplers, min_size=3, max_size=3), st.integers(8, 24))
def test_composition_with_upsampling_is_associative(stack, n):
    geometries = []
    for step in stack:
        sources = reads(n, step)
        assume(len(sources) >= 4 and any(sources))
        geometries.append(Field.of_input((n,)).resample(0, sources).rfs[0])
    a, b, c = geometries
    assume(all(a.interval(u) is not None for u in range(a.period)))
    assume(all(b.interval(u) is not None for u in range(b.period)))
    assert compose(compose(a, b), c) == compose(a, compose(b, c))


# ---- the smallest and largest field over paths ------------------------------------------------
# Random branching graphs along one axis of even length n: every operation keeps the length and the
# average stride, so any two branches can merge; some add fractional strides (a strided window, then
# an upsampling of one of several patterns) or mix the axis. Each path is then built on its own and
# its size read: the merged graph's min_size / max_size must be their minimum and maximum.
path_ops = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from([1, 3, 5]), st.integers(1, 3)),  # kernel, dilation
    st.tuples(st.just("down_up"), st.sampled_from([1, 2, 3]), st.sampled_from(["nearest", "linear", "holes"])),
    st.tuples(st.just("shift"), st.integers(1, 3)),  # pad in front, then crop as much: the identity geometry
    st.tuples(st.just("mix")),
)
graphs = st.recursive(
    st.lists(path_ops, min_size=1, max_size=3),
    lambda inner: st.lists(st.one_of(path_ops, st.tuples(st.just("branches"), inner, inner)), min_size=1, max_size=3),
    max_leaves=8,
)


def upsampling_sources(kind: str, n: int) -> list[list[int]]:
    """What each of ``n`` outputs reads of ``n // 2`` inputs: nearest, linear (clamped) or a stride-2 kernel-3
    transposed convolution (even outputs read two inputs, odd ones one)."""
    half = n // 2
    if kind == "nearest":
        return [[u // 2] for u in range(n)]
    if kind == "linear":
        return [sorted({min(max((u - 1) // 2, 0), half - 1), min((u + 1) // 2, half - 1)}) for u in range(n)]
    return [[v for v in (u // 2 - 1, u // 2) if 0 <= v < half and 0 <= u - 2 * v < 3] for u in range(n)]


def apply_op(field: Field, op: tuple, n: int) -> Field:
    kind = op[0]
    if kind == "conv":
        _, kernel, dilation = op
        return field.window(0, kernel, 1, dilation * (kernel - 1) // 2, n, dilation)
    if kind == "down_up":
        _, kernel, how = op
        down = field.window(0, kernel, 2, (kernel - 1) // 2, n // 2)
        return down.resample(0, upsampling_sources(how, n))
    if kind == "shift":
        return field.pad(0, op[1], n + op[1]).take(0, op[1], 1, n)
    return field.mix(0)


def run_graph(field: Field, graph: list, n: int) -> Field:
    for op in graph:
        if op[0] == "branches":
            field = merge([run_graph(field, op[1], n), run_graph(field, op[2], n)])
        else:
            field = apply_op(field, op, n)
    return field


def every_path(graph: list) -> list[list[tuple]]:
    """Each path through ``graph`` as its list of operations (a branching block: either branch)."""
    paths: list[list[tuple]] = [[]]
    for op in graph:
        ways = every_path(op[1]) + every_path(op[2]) if op[0] == "branches" else [[op]]
        paths = [path + way for path in paths for way in ways]
    return paths


@given(graphs, st.integers(3, 10))
def test_smallest_and_largest_field_equal_an_enumeration_of_paths(graph, half):
    n = 2 * half
    merged = run_graph(Field.of_input((n,)), graph, n)
    sizes = [run_graph(Field.of_input((n,)), path, n).rfs[0].size for path in every_path(graph)]
    assert merged.min_size == (min(sizes),) and merged.max_size == (max(sizes),)
    if "mix" not in str(graph):  # (a global branch that sees the whole image makes the union global: size n)
        assert merged.max_size[0] <= merged.rfs[0].size  # the union of the paths' fields holds each


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(-3, 3)), min_size=1, max_size=6), st.integers(1, 3))
def test_only_geometries_no_other_bounds_are_kept(members, jump):
    """Of paths of one stride, the smallest and the largest are kept (one of each size), whatever comes after."""
    paths = [AxisRF(size, jump, start) for size, start in members]
    kept = extreme_paths(paths)
    assert {rf.size for rf in kept} == {min(s for s, _ in members), max(s for s, _ in members)}
    assert all(within(a, b) == (a.size <= b.size) for a in paths for b in paths)
