"""Receptive-field algebra, in pure Python.

Every layer of a convolutional network, seen along one spatial axis, maps output
position ``u`` to the half-open input interval ``[u * jump + start, u * jump + start + size)``.
That triple is an :class:`AxisRF`. In the terms of Araujo, Norris and Sim,
"Computing Receptive Fields of Convolutional Neural Networks" (Distill, 2019):

* ``size`` is the receptive-field size ``r``,
* ``jump`` is the effective stride ``S`` (the product of the strides so far),
* ``start`` is minus the effective padding ``P``: unit 0 sees ``[-P, -P + r)``.

Composing a layer ``then`` (kernel ``k``, dilation ``d``, stride ``s``, padding ``p``) after
the geometry ``first`` gives::

    size  = first.size + (d * (k - 1)) * first.jump
    jump  = first.jump * s
    start = first.start - p * first.jump

which unrolls to ``r = 1 + sum_l (k_l - 1) * prod_{i<l} s_i`` with ``k_l`` the dilated kernel
``d_l * (k_l - 1) + 1``. Padding moves the interval (``start``), never its ``size``.

A ``jump`` of 0 means every unit sees the same interval: the axis has been mixed by a global
operation (global pooling followed by broadcasting, flatten + Linear, softmax or attention
across positions, normalisation over the spatial axes).

**Fractional strides.** Upsampling (transposed convolution, interpolation, pixel shuffle) makes
output positions advance by less than one input pixel, and not always by the same amount: after a
stride-2 convolution and a nearest 2x upsampling, units ``2k`` and ``2k + 1`` share one interval.
Such an axis is *periodic*: ``phases`` holds the exact intervals of units ``0 .. P - 1`` and every
period of ``P`` units advances ``jump * P`` (a whole number of) input pixels. Then

* ``jump`` is the average advance per unit, an exact :class:`~fractions.Fraction` (``1/2``);
* ``size`` is the largest interval over the phases;
* ``start`` is the low end of unit 0's interval (so ``padding = -start`` is still how far unit 0
  reaches before input pixel 0; where unit 0 reads nothing, the first unit that reads something).

``interval(u)`` is exact for every unit (a periodic pattern extends into the padding as a uniform
one does); the exact boxes of :class:`Field` do not depend on it.

A periodic geometry with ``P = 1`` is an ordinary one: ``jump`` is then an ``int`` again.

**Paths.** After a residual add or a concatenation, a unit is reached from the input along several
paths (Richter et al., "Should You Go Deeper?", ICMLA 2021): the identity shortcut of a ResNet block
is one, its two convolutions another. Each path has its own analytic geometry; the geometry of the
tensor (``Field.rfs``) is their union. :attr:`Field.min_size` and :attr:`Field.max_size` are the
smallest and largest size over all paths, carried through every layer without enumerating them:
paths whose geometries differ only by the width of their intervals (the same stride and, after
upsampling, the same pattern of phases) keep their order of size through every later layer; more
generally a path whose every unit sees part of what another path's sees never sees more after any
layer (:func:`within`), so only the paths that no other bounds are kept (:func:`extreme_paths`).

This module imports nothing outside the standard library, so the maths can be checked
without torch.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from rf_callback.errors import MisalignedBranchesError

__all__ = [
    "IDENTITY",
    "AxisRF",
    "Box",
    "Field",
    "MisalignedBranchesError",
    "OnlyHolesError",
    "compose",
    "extreme_paths",
    "layer",
    "merge",
    "mixed",
    "periodic",
    "resampling",
    "within",
]


@dataclass(frozen=True, repr=False)
class AxisRF:
    """Geometry of one spatial axis: unit ``u`` sees ``[u * jump + start, u * jump + start + size)``.

    A periodic geometry (after upsampling, see the module's docstring) also has ``phases``: the
    intervals ``(low, high)`` of units ``0 .. P - 1`` (None for a unit that reads no input); unit
    ``u = b * P + r`` sees ``phases[r]`` shifted by ``b * jump * P``. Build those with
    :func:`periodic`.

    Example::
        >>> rf = AxisRF(size=5, jump=2, start=-2)
        >>> rf.interval(0), rf.interval(3)
        ((-2, 3), (4, 9))
        >>> rf.padding, rf.center(3)
        (2, 6.0)
        >>> up = periodic([(0, 1), (0, 1)], advance=1)  # nearest 2x: two units per input position
        >>> up.jump, up.interval(2), up.interval(3)
        (Fraction(1, 2), (1, 2), (1, 2))
    """

    size: int = 1
    jump: int | Fraction = 1
    start: int = 0
    phases: tuple[tuple[int, int] | None, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 1 or self.jump < 0:
            raise ValueError(f"AxisRF needs size >= 1 and jump >= 0, got size={self.size}, jump={self.jump}.")
        if not self.phases and not isinstance(self.jump, int):
            raise ValueError(f"AxisRF with a fractional jump ({self.jump}) needs phases; build it with periodic().")

    def __repr__(self) -> str:
        phases = f", phases={self.phases!r}" if self.phases else ""
        return f"AxisRF(size={self.size!r}, jump={self.jump!r}, start={self.start!r}{phases})"

    @property
    def padding(self) -> int:
        """Effective padding: how far unit 0's field reaches before input position 0."""
        return -self.start

    @property
    def period(self) -> int:
        """How many units make one period of the geometry (1 unless upsampled)."""
        return len(self.phases) or 1

    @functools.cached_property
    def advance(self) -> int:
        """Input pixels one period advances: ``jump * period``, a whole number."""
        return int(self.jump * self.period)

    def intervals(self, start: int, stop: int) -> list[tuple[int, int] | None]:
        """``[interval(u) for u in range(start, stop)]``, faster.

        Example::
            >>> periodic([(0, 1), None], advance=1).intervals(0, 4)
            [(0, 1), None, (1, 2), None]
        """
        if not self.phases:
            return [(u * self.jump + self.start, u * self.jump + self.start + self.size) for u in range(start, stop)]
        phases, count, advance = self.phases, len(self.phases), self.advance
        found: list[tuple[int, int] | None] = []
        for u in range(start, stop):
            block, phase = divmod(u, count)
            interval = phases[phase]
            found.append(None if interval is None else (interval[0] + block * advance, interval[1] + block * advance))
        return found

    def interval(self, index: int) -> tuple[int, int] | None:
        """Half-open input interval ``(low, high)`` seen by output position ``index`` (not clipped).

        None only for a unit of a periodic geometry that reads no input (the holes of a transposed
        convolution whose kernel is smaller than its stride).
        """
        if not self.phases:
            low = index * self.jump + self.start
            return low, low + self.size
        block, phase = divmod(index, len(self.phases))
        interval = self.phases[phase]
        if interval is None:
            return None
        shift = block * self.advance
        return interval[0] + shift, interval[1] + shift

    def center(self, index: int) -> float:
        """Input coordinate of the centre of output position ``index``'s field."""
        interval = self.interval(index)
        if interval is None:  # a unit that reads nothing: where the average geometry puts it
            return float(index * self.jump + self.start + Fraction(self.size - 1, 2))
        return (interval[0] + interval[1] - 1) / 2


IDENTITY = AxisRF()
"""The geometry of the input itself: each position sees only itself."""


def layer(kernel: int = 1, stride: int = 1, padding: int = 0, dilation: int = 1) -> AxisRF:
    """Geometry of one sliding-window layer (convolution, pooling, padding, cropping).

    ``padding`` counts positions added before the first input position (negative crops);
    padding added after the last position changes the output length, not the geometry.

    Example::
        >>> layer(kernel=3, stride=2, padding=1)
        AxisRF(size=3, jump=2, start=-1)
        >>> layer(kernel=3, dilation=2)  # a dilated kernel equals its effective kernel
        AxisRF(size=5, jump=1, start=0)
    """
    if kernel < 1 or stride < 1 or dilation < 1:
        raise ValueError(
            f"layer needs kernel, stride and dilation >= 1, got kernel={kernel}, stride={stride}, dilation={dilation}."
        )
    return AxisRF(size=dilation * (kernel - 1) + 1, jump=stride, start=-padding)


def mixed(extent: int) -> AxisRF:
    """Geometry of an operation where every output unit reads all ``extent`` input positions.

    Example::
        >>> compose(AxisRF(size=3, jump=2, start=-1), mixed(4))
        AxisRF(size=9, jump=0, start=-1)
    """
    return AxisRF(size=extent, jump=0, start=0)


def compose(first: AxisRF, then: AxisRF) -> AxisRF:
    """Geometry of ``then`` applied after ``first``, in input pixels.

    Example::
        >>> compose(AxisRF(size=3, jump=1, start=-1), AxisRF(size=3, jump=2, start=-1))
        AxisRF(size=5, jump=2, start=-2)
        >>> down = layer(kernel=3, stride=2, padding=1)
        >>> compose(down, periodic([(0, 1), (0, 1)], advance=1))  # then nearest 2x: units 2k, 2k+1 share a field
        AxisRF(size=3, jump=1, start=-1, phases=((-1, 2), (-1, 2)))
    """
    if first.jump == 0 and not first.phases:  # every unit already sees the same interval: nothing changes
        return first
    if not first.phases and not then.phases:
        return AxisRF(
            size=first.size + (then.size - 1) * first.jump,
            jump=first.jump * then.jump,
            start=first.start + then.start * first.jump,
        )
    # Periodic: a period of `then` advances then.advance of first's units; the result repeats once
    # that advance is a whole number of first's periods.
    repeat = 1 if then.advance == 0 else first.period // math.gcd(first.period, then.advance)
    period = then.period * repeat
    advance = repeat * then.advance // first.period * first.advance
    reads = [then.interval(u) for u in range(period)]
    if not first.phases:  # the hull of a run of an ordinary geometry's intervals, at once
        jump, start, size = first.jump, first.start, first.size
        intervals = [None if r is None else (r[0] * jump + start, (r[1] - 1) * jump + start + size) for r in reads]
        return periodic(intervals, advance)
    low = min(r[0] for r in reads if r is not None)
    seen = first.intervals(low, max(r[1] for r in reads if r is not None))  # each of first's units once
    return periodic([None if r is None else _union(seen[r[0] - low : r[1] - low]) for r in reads], advance)


class OnlyHolesError(ValueError):
    """Every unit of a geometry reads only the holes of an upsampling (a transposed convolution whose kernel
    is smaller than its stride): nothing it computes depends on the input."""


def periodic(intervals: Sequence[tuple[int, int] | None], advance: int) -> AxisRF:
    """The geometry whose units ``0 .. P - 1`` see ``intervals``, each next ``P`` units the same shifted by ``advance``.

    The shortest period that repeats is kept; a period of one unit is an ordinary geometry.

    Example::
        >>> periodic([(0, 2), (1, 3)], advance=2)  # uniform after all
        AxisRF(size=2, jump=1, start=0)
        >>> periodic([(0, 1), None], advance=1)  # every other unit reads nothing
        AxisRF(size=1, jump=Fraction(1, 2), start=0, phases=((0, 1), None))
    """
    count = len(intervals)
    if not any(interval is not None for interval in intervals):
        raise OnlyHolesError("no unit reads a position that sees the input: it reads only holes of an upsampling")
    period, step = count, advance
    for candidate in range(1, count):
        if count % candidate or (advance * candidate) % count:
            continue
        shift = advance * candidate // count
        if all(_shifted(intervals[r % candidate], (r // candidate) * shift) == intervals[r] for r in range(count)):
            period, step = candidate, shift
            break
    phases = tuple(intervals[:period])
    size = max(high - low for low, high in (p for p in phases if p is not None))
    start = next(p for p in phases if p is not None)[0]
    if period == 1 and phases[0] is not None:
        return AxisRF(size=size, jump=step, start=start)
    jump = Fraction(step, period)
    return AxisRF(size=size, jump=int(jump) if jump.denominator == 1 else jump, start=start, phases=phases)


def _shifted(interval: tuple[int, int] | None, shift: int) -> tuple[int, int] | None:
    return None if interval is None else (interval[0] + shift, interval[1] + shift)


def resampling(sources: Sequence[Sequence[int]], length: int, margin: int = 2) -> AxisRF:
    """Geometry of a layer whose output position ``u`` reads input positions ``sources[u]`` (of ``length``).

    Where the whole axis repeats a shorter pattern (nearest, transposed convolution, pixel shuffle)
    that pattern is the geometry. Interpolation that clamps at the ends (bilinear, bicubic) reads
    fewer positions there: the geometry is then the periodic pattern of the interior, extended to
    every position (as a convolution's geometry extends into its padding). Where neither exists,
    the whole axis is one period (exact, if long). The boxes never depend on this choice.

    Example::
        >>> resampling([[0], [0], [1], [1], [2], [2], [3], [3], [4], [4], [5], [5]], length=6)  # nearest 2x
        AxisRF(size=1, jump=Fraction(1, 2), start=0, phases=((0, 1), (0, 1)))
        >>> bilinear = [[0], [0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3, 4], [3, 4], [4, 5], [4, 5], [5]]
        >>> resampling(bilinear, length=6)  # unit 0 reads 'pixel -1' in the interior's pattern
        AxisRF(size=2, jump=Fraction(1, 2), start=-1, phases=((-1, 1), (0, 2)))
    """
    hulls = [(min(s), max(s) + 1) if len(s) else None for s in sources]
    count = len(hulls)
    whole = periodic(hulls, length)
    if whole.period < count:  # periodic up to the ends (nearest, transposed convolution, pixel shuffle)
        return whole
    exact = _repeating(hulls)
    if exact is not None:  # periodic, with a last period cut short (a stride that does not divide the axis)
        return exact
    for period in range(1, count // 4 + 1):
        first, last = margin, count - margin - period  # compare u with u + period, clear of the ends
        if last - first < max(2 * period, 4) or hulls[first] is None or hulls[first + period] is None:
            continue
        step = hulls[first + period][0] - hulls[first][0]  # type: ignore[index]
        if all(_shifted(hulls[u], step) == hulls[u + period] for u in range(first, last)):
            block = -(-first // period)
            return periodic([_shifted(hulls[block * period + r], -block * step) for r in range(period)], step)
    return whole


def _repeating(hulls: Sequence[tuple[int, int] | None]) -> AxisRF | None:
    """The shortest pattern of at most half the units that every unit repeats exactly, shifted by a fixed step.

    Example::
        >>> _repeating([(0, 1), None, None, (1, 2), None, None, (2, 3)])  # a stride-3 transposed convolution
        AxisRF(size=1, jump=Fraction(1, 3), start=0, phases=((0, 1), None, None))
    """
    count = len(hulls)
    for period in range(1, count // 2 + 1):
        step = None
        for u in range(count - period):
            a, b = hulls[u], hulls[u + period]
            if a is None or b is None:
                if a is not b:
                    break
                continue
            if b[0] - a[0] != b[1] - a[1] or (step is not None and b[0] - a[0] != step):
                break
            step = b[0] - a[0]
        else:
            if step is not None and step > 0 and any(hulls[:period]):
                return periodic(hulls[:period], step)
    return None


def _hull(rfs: Sequence[AxisRF], jump: int | Fraction) -> AxisRF:
    if all(rf is rfs[0] for rf in rfs) and rfs[0].jump == jump:
        return rfs[0]
    if isinstance(jump, int) and all(not rf.phases for rf in rfs):
        low = min(rf.start for rf in rfs)
        high = max(rf.start + rf.size for rf in rfs)
        return AxisRF(size=high - low, jump=jump, start=low)
    if any(rf.jump != jump for rf in rfs):  # one output position: only unit 0 matters
        low, high = _union(rf.interval(0) for rf in rfs)  # type: ignore[misc]
        return AxisRF(size=high - low, jump=0, start=low)
    period = math.lcm(*(rf.period for rf in rfs))
    return periodic([_union(rf.interval(u) for rf in rfs) for u in range(period)], int(jump * period))


Paths = tuple[AxisRF, ...]
"""The geometries of an axis's paths that bound their sizes from now on (see :func:`extreme_paths`)."""


def within(inner: AxisRF, outer: AxisRF) -> bool:
    """Whether every unit of ``inner`` sees a part of what the same unit of ``outer`` sees, up to one shift.

    That is ``inner``'s interval of unit ``u`` inside ``outer``'s shifted by one ``t`` for every ``u``
    (a unit of ``inner`` that sees nothing fits anywhere). It lasts: a later layer's unit sees the
    union of the same units' intervals in both, so the union in ``inner`` stays inside the one in
    ``outer``, and ``inner``'s size never exceeds ``outer``'s again. Two ordinary geometries of one
    stride: ``inner.size <= outer.size``.

    Example::
        >>> within(layer(3), layer(5)), within(layer(5), layer(3)), within(layer(3), layer(5, stride=2))
        (True, False, False)
        >>> windows = periodic([(0, 4)] * 4, advance=4)  # four units share each 4-pixel window
        >>> within(IDENTITY, windows), within(layer(2), windows)  # a 2-wide field crosses a window's edge
        (True, False)
    """
    if inner.jump != outer.jump:
        return False
    if not inner.phases and not outer.phases:
        return inner.size <= outer.size
    count = math.lcm(inner.period, outer.period)  # the pattern of differences repeats after that many units
    low, high = -math.inf, math.inf  # the shifts t that put inner inside outer so far
    for seen, around in zip(inner.intervals(0, count), outer.intervals(0, count)):
        if seen is None:
            continue
        if around is None:
            return False
        low, high = max(low, seen[1] - around[1]), min(high, seen[0] - around[0])
        if low > high:
            return False
    return True


def extreme_paths(paths: Iterable[AxisRF]) -> Paths:
    """The geometries among ``paths`` that bound every path's size from now on.

    A path whose field lies :func:`within` another's is never larger than it, after any layer: it can
    be dropped as a candidate for the largest field, and the other one as a candidate for the
    smallest. What is left holds the smallest and the largest size over all ``paths``, now and after
    any later layer applied to all of them alike, so networks with many paths (residual stages,
    dense blocks) carry a few geometries, not one per path. Geometries of different strides never
    bound each other (after a global pooling they may: both then have stride 0).

    Example::
        >>> extreme_paths([layer(3), layer(7), layer(5), layer(1, stride=2)])  # strides 1 and 2
        (AxisRF(size=3, jump=1, start=0), AxisRF(size=7, jump=1, start=0), AxisRF(size=1, jump=2, start=0))
    """
    paths = tuple(paths)
    if not any(rf.phases for rf in paths):  # the usual case, no upsampling: per stride, the smallest and largest
        extremes: dict[int | Fraction, list[AxisRF]] = {}
        for rf in paths:
            pair = extremes.get(rf.jump)
            if pair is None:
                extremes[rf.jump] = [rf, rf]
            elif rf.size < pair[0].size:
                pair[0] = rf
            elif rf.size > pair[1].size:
                pair[1] = rf
        return tuple(rf for low, high in extremes.values() for rf in ((low,) if low.size == high.size else (low, high)))
    groups: dict[int | Fraction, list[AxisRF]] = {}
    for rf in paths:
        groups.setdefault(rf.jump, []).append(rf)
    kept: list[AxisRF] = []
    for group in groups.values():
        plain = [rf for rf in group if not rf.phases]  # ordinary ones bound each other by size alone
        if len(plain) > 2:
            group = [min(plain, key=_size), max(plain, key=_size)] + [rf for rf in group if rf.phases]
        if len(group) > 1:
            group = list(dict.fromkeys(group))
        if len(group) == 1:
            kept += group
            continue
        inside = [[a is not b and within(a, b) for b in group] for a in group]  # inside[i][j]: i within j
        # j makes i redundant where j bounds i strictly, or the two are equal up to a shift and j comes first.
        indices = range(len(group))
        smallest = [group[i] for i in indices if not any(inside[j][i] and (not inside[i][j] or j < i) for j in indices)]
        largest = [group[i] for i in indices if not any(inside[i][j] and (not inside[j][i] or j < i) for j in indices)]
        kept += dict.fromkeys(smallest + largest)
    return tuple(kept)


def _size(rf: AxisRF) -> int:
    return rf.size


Box = tuple[int, int] | None
"""A half-open input interval ``(low, high)``, or None for a unit that sees only padding."""
PadMode = Literal["constant", "reflect", "replicate", "circular"]


_low, _high = operator.itemgetter(0), operator.itemgetter(1)


def _union(boxes: Iterable[Box]) -> Box:
    found = list(filter(None, boxes))  # a box is a non-empty tuple: only None is dropped
    if not found:
        return None
    return min(found)[0], max(map(_high, found))  # the least (low, high) has the lowest low


def _source(v: int, n: int, mode: PadMode) -> int | None:
    """The input position a padded position ``v`` copies, or None for a constant."""
    if 0 <= v < n:
        return v
    if mode == "constant":
        return None
    if mode == "replicate":
        return min(max(v, 0), n - 1)
    if mode == "circular":
        return v % n
    period = 2 * (n - 1)  # reflect
    v = abs(v) % period if period else 0
    return period - v if v >= n else v


Boxes = tuple[Box, ...]
"""The exact box of every position along one axis."""


def _window(boxes: Boxes, kernel: int, stride: int, padding: int, length: int, dilation: int) -> Boxes:
    n, span = len(boxes), dilation * (kernel - 1)
    monotone = None not in boxes
    if monotone:
        lows, highs = list(map(_low, boxes)), list(map(_high, boxes))
        monotone = lows == sorted(lows) and highs == sorted(highs)
    if not monotone:
        return tuple(
            _union(
                boxes[v] for v in range(u * stride - padding, u * stride - padding + span + 1, dilation) if 0 <= v < n
            )
            for u in range(length)
        )
    # Monotone boxes: a unit sees from its first real read's low to its last real read's high. Units
    # whose reads all lie inside the axis take both from strided slices, at C speed; the others one by one.
    inner_start = min(length, max(0, -(-padding // stride)))
    inner_stop = max(inner_start, min(length, (n - 1 - span + padding) // stride + 1))
    first = inner_start * stride - padding
    result: list[Box] = [
        _monotone_window(lows, highs, u * stride - padding, kernel, dilation) for u in range(inner_start)
    ]
    result += zip(lows[first : first + (inner_stop - inner_start) * stride : stride], highs[first + span :: stride])
    result += [_monotone_window(lows, highs, u * stride - padding, kernel, dilation) for u in range(inner_stop, length)]
    return tuple(result)


def _monotone_window(lows: list[int], highs: list[int], first: int, kernel: int, dilation: int) -> Box:
    """The box of a window whose reads start at ``first``, over monotone boxes; None if it reads only padding."""
    n = len(lows)
    first_j = -(first // dilation) if first < 0 else 0  # the first read at a position >= 0
    last_j = min(kernel - 1, (n - 1 - first) // dilation) if first <= n - 1 else -1  # the last one < n
    if first_j > last_j:
        return None
    return lows[first + first_j * dilation], highs[first + last_j * dilation]


def _covers(big: Boxes, small: Boxes) -> bool:
    if big == small:  # shared or equal boxes (most branches): one C-level comparison
        return True
    if len(big) > 1 and None not in big and None not in small:  # whole axes at C speed; one box: the generator
        return all(map(operator.le, map(_low, big), map(_low, small))) and all(
            map(operator.ge, map(_high, big), map(_high, small))
        )
    return all(b is None or (a is not None and a[0] <= b[0] and b[1] <= a[1]) for a, b in zip(big, small))


def _fold(branches: list[tuple[Boxes, ...]]) -> tuple[Boxes, ...]:
    """One branch equivalent to ``branches`` that see something at every position: per axis, the unions.

    A unit's box is the hull of its branches' rectangles, taken axis by axis; when every branch has
    a rectangle at every unit (no None), that is the union of their intervals on each axis, and
    every later window, pad, slice or mix acts on each axis alike, so the fold stays exact.
    """
    folded: list[Boxes] = []
    done: dict[tuple[int, ...], Boxes] = {}  # axes that hold the very same boxes (a square image's) fold once
    for axis in zip(*branches):
        key = tuple(map(id, axis))
        if key in done:
            folded.append(done[key])
            continue
        lows, highs = list(map(_low, axis[0])), list(map(_high, axis[0]))
        for boxes in axis[1:]:
            if boxes != axis[0]:  # conditionals, not min() / max(): a call per position costs twice as much
                lows = [a if a <= b else b for a, b in zip(lows, map(_low, boxes))]  # noqa: FURB136
                highs = [a if a >= b else b for a, b in zip(highs, map(_high, boxes))]  # noqa: FURB136
        done[key] = tuple(zip(lows, highs))
        folded.append(done[key])
    return tuple(folded)


def _prune(branches: Iterable[tuple[Boxes, ...]]) -> tuple[tuple[Boxes, ...], ...]:
    """The branches that add something: covered ones dropped, those that see something everywhere folded."""
    full: list[tuple[Boxes, ...]] = []
    partial: list[tuple[Boxes, ...]] = []
    for branch in branches:
        (full if all(None not in axis for axis in branch) else partial).append(branch)
    full = _uncovered(full)  # a residual's skip, a gated path's input: folding them would change nothing
    if len(full) > 1:  # shifted copies (patch merging, space-to-depth) would multiply otherwise
        full = [_fold(full)]
    return tuple(_uncovered(full + partial))


def _uncovered(branches: list[tuple[Boxes, ...]]) -> list[tuple[Boxes, ...]]:
    """``branches`` without those that another one covers on every axis (of equal ones, the first)."""
    kept: list[tuple[Boxes, ...]] = []
    for branch in branches:
        if any(other == branch or all(map(_covers, other, branch)) for other in kept):
            continue
        kept = [other for other in kept if not all(map(_covers, branch, other))] + [branch]
    return kept


@dataclass(frozen=True)
class Field:
    """The receptive field of every unit of a tensor: Distill's triple per axis and the exact boxes.

    ``rfs[a]`` is the analytic geometry of axis ``a`` (size, effective stride, effective padding).
    ``branches`` hold the exact boxes: for each path from the input (several after residual adds
    or concatenations), for each axis, for each position, the half-open interval of input pixels
    that reach it through real positions only. Strides that drop border pixels, dilation holes at
    the border, reflect / replicate / circular padding and branches that see only padding at a
    corner are all exact, because a unit's box is the hull of its branches' rectangles. Branches
    that see something at every position are folded into one (their intervals united axis by axis,
    which gives the same hulls), so that shifted copies do not multiply.

    ``paths[a]`` holds the analytic geometries of the paths from the input that bound their sizes
    along axis ``a`` (see :func:`extreme_paths`): :attr:`min_size` and :attr:`max_size` read them.
    ``rfs[a]`` is the union of every path's geometry, so ``min_size <= max_size <= size``.

    Example::
        >>> field = Field.of_input((28,)).window(0, kernel=3, stride=2, padding=1, length=14)
        >>> field.rfs[0], field.box((0,)), field.box((13,))
        (AxisRF(size=3, jump=2, start=-1), ((0, 2),), ((25, 28),))
        >>> Field.of_input((5,)).window(0, kernel=2, stride=2, padding=0, length=2).box((1,))  # pixel 4 is dropped
        ((2, 4),)
        >>> body = field.window(0, kernel=3, stride=1, padding=1, length=14)
        >>> residual = merge([body, field])  # a 3-wide convolution beside an identity shortcut
        >>> residual.rfs[0].size, residual.min_size, residual.max_size
        (7, (3,), (7,))
    """

    rfs: tuple[AxisRF, ...]
    branches: tuple[tuple[Boxes, ...], ...]
    paths: tuple[Paths, ...]

    @classmethod
    def of_input(cls, shape: Sequence[int]) -> Field:
        """The input itself: each position sees only itself."""
        identities = {n: tuple((i, i + 1) for i in range(n)) for n in set(shape)}  # one per length: axes share
        return cls((IDENTITY,) * len(shape), (tuple(identities[n] for n in shape),), ((IDENTITY,),) * len(shape))

    def length(self, axis: int) -> int:
        return len(self.branches[0][axis])

    @property
    def min_size(self) -> tuple[int, ...]:
        """Per axis, the smallest receptive-field size over all paths from the input (Richter et al.'s r_min)."""
        return tuple(min(rf.size for rf in paths) for paths in self.paths)

    @property
    def max_size(self) -> tuple[int, ...]:
        """Per axis, the largest receptive-field size over all paths from the input (r_max)."""
        return tuple(max(rf.size for rf in paths) for paths in self.paths)

    def _along(
        self, axis: int, rf: AxisRF, then: Callable[[AxisRF], AxisRF], step: Callable[[Boxes], Boxes] | None
    ) -> Field:
        """``rf`` on ``axis``, each path's geometry ``then(path)``, whose boxes become ``step(boxes)`` in each branch."""
        paths = self.paths[axis]
        if len(paths) == 1 and paths[0] is self.rfs[axis]:  # one path: it is the field's geometry, done already
            paths = (rf,)
        else:
            after = tuple(map(then, paths))
            if len(after) != 2 or after[0].jump != after[1].jump or after[0].phases or after[1].phases:
                after = extreme_paths(after)  # else: a smallest and a largest ordinary one of one stride, still so
            paths = _own(after, rf)
        return self._with(axis, rf, paths, step, axis)

    def _with(self, axis: int, rf: AxisRF, paths: Paths, step: Callable[[Boxes], Boxes] | None, source: int) -> Field:
        """``rf`` and ``paths`` on ``axis``, whose boxes become ``step(boxes)`` (without ``step``: ``source``'s)."""
        rfs = self.rfs[:axis] + (rf,) + self.rfs[axis + 1 :]
        branches = tuple(
            branch[:axis] + (step(branch[axis]) if step is not None else branch[source],) + branch[axis + 1 :]
            for branch in self.branches
        )
        every = self.paths[:axis] + (paths,) + self.paths[axis + 1 :]
        return Field(rfs, branches if len(branches) == 1 else _prune(branches), every)  # one branch: no pruning

    def window(self, axis: int, kernel: int, stride: int, padding: int, length: int, dilation: int = 1) -> Field:
        """After a sliding window (convolution, pooling) along ``axis`` producing ``length`` positions."""
        first = self.rfs[axis]
        if first.phases or kernel < 1 or stride < 1 or dilation < 1:  # layer() names what is wrong
            rf = compose(first, layer(kernel, stride, padding, dilation))
        else:  # compose() of an ordinary geometry, inlined: a network has hundreds of windows
            rf = AxisRF(
                first.size + dilation * (kernel - 1) * first.jump,
                first.jump * stride,
                first.start - padding * first.jump,
            )
        reach = dilation * (kernel - 1)

        def then(path: AxisRF) -> AxisRF:
            if path.phases:
                return compose(path, layer(kernel, stride, padding, dilation))
            if path.jump == 0:  # a path through a global layer: every unit already sees the same
                return path
            return AxisRF(path.size + reach * path.jump, path.jump * stride, path.start - padding * path.jump)

        return self._along(axis, rf, then, lambda boxes: _window(boxes, kernel, stride, padding, length, dilation))

    def windows(self, windows: Sequence[tuple[int, int, int, int, int, int]]) -> Field:
        """After sliding windows along several axes (a 2-D convolution), each ``(axis, kernel, stride, padding,
        length, dilation)`` as :meth:`window` takes them.

        An axis that holds the very boxes of one already done, and takes the same window, gets its
        result without computing it again (a square image through square kernels: half the work).

        Example::
            >>> square = Field.of_input((8, 8)).windows([(0, 3, 2, 1, 4, 1), (1, 3, 2, 1, 4, 1)])
            >>> square.branches[0][1] is square.branches[0][0]
            True
        """
        field, done = self, {}
        for axis, *window in windows:
            key = (id(self.rfs[axis]), id(self.paths[axis]), *(id(branch[axis]) for branch in self.branches), *window)
            source = done.get(key)
            if source is None:
                field = field.window(axis, *window)
                done[key] = axis
            else:
                field = field._with(axis, field.rfs[source], field.paths[source], None, source)
        return field

    def pad(self, axis: int, before: int, length: int, mode: PadMode = "constant") -> Field:
        """After padding ``before`` positions in front of ``axis`` (negative crops), ``length`` in all.

        Example::
            >>> Field.of_input((3,)).pad(0, before=1, length=5, mode="reflect").branches[0][0]
            ((1, 2), (0, 1), (1, 2), (2, 3), (1, 2))
        """

        def step(boxes: Boxes) -> Boxes:
            sources = (_source(u - before, len(boxes), mode) for u in range(length))
            return tuple(None if v is None else boxes[v] for v in sources)

        then = layer(padding=before)
        return self._along(axis, compose(self.rfs[axis], then), lambda path: compose(path, then), step)

    def take(self, axis: int, start: int, step: int, length: int) -> Field:
        """After slicing ``[start::step]`` to ``length`` positions along ``axis``."""
        then = layer(stride=step, padding=-start)
        return self._along(
            axis,
            compose(self.rfs[axis], then),
            lambda path: compose(path, then),
            lambda boxes: tuple(boxes[start + u * step] for u in range(length)),
        )

    def resample(self, axis: int, sources: Sequence[Sequence[int]], geometry: AxisRF | None = None) -> Field:
        """After a layer whose output position ``u`` along ``axis`` reads the positions ``sources[u]``.

        Upsampling of every kind (transposed convolution, interpolation, pixel shuffle) is such a
        layer: each box is the union of the boxes read, so it stays exact however the positions
        are shared. ``geometry`` defaults to :func:`resampling` of ``sources``.

        Example::
            >>> down = Field.of_input((8,)).window(0, kernel=3, stride=2, padding=1, length=4)
            >>> up = down.resample(0, [[u // 2] for u in range(8)])  # nearest 2x
            >>> [up.box((u,)) for u in range(4)]  # units 2k and 2k + 1 share a box
            [((0, 2),), ((0, 2),), ((1, 4),), ((1, 4),)]
            >>> up.rfs[0]  # back at the input's resolution: stride 1 on average, but in steps of 0 and 2
            AxisRF(size=3, jump=1, start=-1, phases=((-1, 2), (-1, 2)))
        """
        geometry = geometry if geometry is not None else resampling(sources, self.length(axis))
        return self._along(
            axis,
            compose(self.rfs[axis], geometry),
            lambda path: compose(path, geometry),  # type: ignore[arg-type]
            lambda boxes: tuple(_union(boxes[v] for v in reads) for reads in sources),
        )

    def mix(self, axis: int) -> Field:
        """After an operation where every position along ``axis`` reads all of them (softmax, statistics)."""
        first = self.rfs[axis]
        if first.phases:
            rf = compose(first, mixed(self.length(axis)))
        else:  # compose() with mixed(), inlined
            rf = AxisRF(first.size + (self.length(axis) - 1) * first.jump, 0, first.start)
        every = mixed(self.length(axis))
        return self._along(axis, rf, lambda path: compose(path, every), lambda boxes: (_union(boxes),) * len(boxes))

    def broadcast(self, axis: int, length: int) -> Field:
        """A length-1 axis repeated to ``length`` positions: each sees what position 0 saw."""
        return self._along(axis, _fixed(self.rfs[axis]), _fixed, lambda boxes: boxes[:1] * length)

    def first(self, axis: int) -> Field:
        """Only position 0 of ``axis`` (an axis that ends up with a single position)."""
        if self.length(axis) == 1:
            return self
        return self._with(axis, self.rfs[axis], self.paths[axis], lambda boxes: boxes[:1], axis)

    def box(self, index: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
        """Exact per-axis intervals ``((low, high), ...)`` of unit ``index``; None if it sees only padding."""
        rectangles = [[branch[a][i] for a, i in enumerate(index)] for branch in self.branches]
        rectangles = [r for r in rectangles if all(interval is not None for interval in r)]
        if not rectangles:
            return None
        return tuple(_union(column) for column in zip(*rectangles))  # type: ignore[misc]


def _seen_everywhere(fields: Sequence[Field], axis: int) -> AxisRF | None:
    """The geometry along ``axis`` of a merge where some branches see one fixed interval at every position, and
    together all that any branch sees: every unit sees just that, whatever strides the others move at.

    That is a pyramid pooling's whole-image bin concatenated with the bins upsampled from 2, 3 and 6
    positions, whose geometries need not agree (``align_corners=True`` moves them by ``(n - 1) / (m - 1)``).
    A branch is fixed when its stride is 0, or when its exact intervals are the same at every position
    in every branch (an upsampled single position). None where no such branches hold everything.

    Example::
        >>> image = Field.of_input((8,))
        >>> local = image.window(0, kernel=3, stride=1, padding=1, length=8)
        >>> coarse = image.window(0, kernel=4, stride=3, padding=0, length=2).resample(0, [[u // 4] for u in range(8)])
        >>> merge([local, coarse, image.mix(0)]).rfs  # the mixed branch holds everything: global
        (AxisRF(size=8, jump=0, start=0),)
    """
    fixed = [
        field
        for field in fields
        if field.rfs[axis].jump == 0
        or all(len(set(branch[axis])) == 1 and all(None not in boxes for boxes in branch) for branch in field.branches)
    ]
    whole = _union(branch[axis][0] for field in fixed for branch in field.branches)
    seen = _union(itertools.chain.from_iterable(branch[axis] for field in fields for branch in field.branches))
    if whole is None or seen is None or not whole[0] <= seen[0] <= seen[1] <= whole[1]:
        return None
    return _hull([field.rfs[axis] for field in fixed], 0)


def merge(fields: Sequence[Field], where: str = "a merge") -> Field:
    """Field of an elementwise merge (add, multiply, concat on channels) of aligned tensors.

    Each output unit sees the union of what the inputs' units at the same position see. Inputs
    must have the same length on every axis (broadcast ones with :meth:`Field.broadcast`).

    Raises:
        MisalignedBranchesError: if, on some axis, branches move at different effective strides, so
            that no single size / stride / padding describes the result (Google's receptive_field
            raises here too). A mixed branch (stride 0) merged with local ones is not misaligned: where
            it sees everything they see, every unit sees it (stride 0); elsewhere each unit sees its own
            field and the fixed one, a geometry with one phase per position.

    Example::
        >>> image = Field.of_input((8,))
        >>> main = image.window(0, kernel=3, stride=2, padding=1, length=4)
        >>> skip = image.window(0, kernel=1, stride=2, padding=0, length=4)
        >>> merge([main, skip]).rfs
        (AxisRF(size=3, jump=2, start=-1),)
    """
    if not fields:
        raise ValueError("merge needs at least one branch.")
    if all(field is fields[0] for field in fields):  # x * sigmoid(x), a tensor added to itself
        return fields[0]
    rfs = []
    for axis in range(len(fields[0].rfs)):
        axis_rfs = [field.rfs[axis] for field in fields]
        if fields[0].length(axis) <= 1:  # one output position: strides no longer matter
            rfs.append(_hull(axis_rfs, axis_rfs[0].jump))
            continue
        local = [rf for rf in axis_rfs if rf.jump > 0]
        spread = [field for field in fields if field.rfs[axis].jump == 0]
        if len({rf.jump for rf in local}) > 1:
            everywhere = _seen_everywhere(fields, axis)
            if everywhere is None:
                raise MisalignedBranchesError(where, axis_rfs)
            rfs.append(everywhere)
            continue
        if local and spread:
            # A fixed field that holds everything the moving ones see makes every unit see it; one that
            # does not (keys pooled past the last rows) adds it to each unit's own: per position.
            whole = _union(branch[axis][0] for field in spread for branch in field.branches)
            seen = _union(itertools.chain.from_iterable(branch[axis] for field in fields for branch in field.branches))
            if whole is not None and (seen is None or whole[0] <= seen[0] and seen[1] <= whole[1]):
                rfs.append(_hull([field.rfs[axis] for field in spread], 0))
                continue
            n, jump = fields[0].length(axis), local[0].jump
            if (jump * n) % 1:
                raise MisalignedBranchesError(where, axis_rfs)
            intervals = [_union(rf.interval(u) for rf in axis_rfs) for u in range(n)]
            rfs.append(periodic(intervals, int(jump * n)))
        else:
            rfs.append(_hull(axis_rfs, axis_rfs[0].jump))
    paths = tuple(
        _own(extreme_paths(rf for field in fields for rf in field.paths[axis]), rfs[axis]) for axis in range(len(rfs))
    )
    return Field(tuple(rfs), _prune(branch for field in fields for branch in field.branches), paths)


def _own(paths: Paths, rf: AxisRF) -> Paths:
    """``paths``, as ``(rf,)`` itself when they are one path equal to ``rf`` (so that later layers see it at once)."""
    return (rf,) if len(paths) == 1 and paths[0] == rf else paths


def _fixed(rf: AxisRF) -> AxisRF:
    """``rf`` seen by every position of a broadcast axis: stride 0."""
    return AxisRF(rf.size, 0, rf.start, rf.phases)
