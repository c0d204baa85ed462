"""Effective-receptive-field statistics of saliency maps, for any number of spatial axes.

Luo, Li, Urtasun and Zemel ("Understanding the Effective Receptive Field in Deep Convolutional
Neural Networks", NIPS 2016) measure a unit's effective field by the pixels whose gradient exceeds a
share of the peak; :func:`erf_stats` computes that and the companions the monitor logs, for maps
of shape ``(N, L, *spatial)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LUO_THRESHOLD",
    "MASS_SHARES",
    "ERFStats",
    "check_threshold_and_mass",
    "erf_stats",
    "finite_maps",
    "finite_mean",
    "mass_areas",
    "mean_area_key",
]


LUO_THRESHOLD = 0.0455
"""1 - 95.45%: Luo et al. count the pixels above this fraction of the peak (a Gaussian's 2-sigma mass)."""


MASS_SHARES = (0.2, 0.5, 0.99)
"""Shares of the probes' mean map's mass whose area :func:`mass_areas` reports (the mean ERF's spread)."""


@dataclass(frozen=True)
class ERFStats:
    """Effective-receptive-field statistics of maps over ``d`` axes (1, 2 or 3), per probe and layer.

    Each per-probe statistic is a float tensor of shape (N, L); sizes are in input pixels (samples
    for 1-D inputs, voxels for 3-D ones). For ``d = 2`` a "cube" is a square and "volume" an area.

    Attributes:
        count: pixels whose saliency exceeds ``threshold`` times the map's own peak (Luo et al.).
        size: ``count ** (1 / d)``, the side of a d-cube of that volume (``sqrt(count)`` for images).
        mass_side: side of the smallest d-cube centred on the unit's RF centre that holds at least
            ``mass`` of the map's total saliency.
        rf_side: ``volume ** (1 / d)`` of the unit's analytic box clipped to the input (the whole
            input for a layer without an analytic field).
        size_fraction: ``size / rf_side``: the ERF's volume relative to the box's, as a side; in
            [0, 1], since every pixel with saliency lies in the box.
        mass_fraction: ``mass_side`` relative to the side of the smallest d-cube around the same
            centre that holds the whole clipped box (how far the field reaches from the unit's
            centre); in [0, 1]. For a unit whose box is a cube centred on it, that is ``rf_side``;
            near the border, where the box is cut but its centre is not moved, and for boxes longer
            on one axis, the reach is the longer distance, so the mass cube never outgrows it.
        extent: (N, L, d): per axis, the length of the interval that bounds the pixels above the threshold.
        dead: True where the map is all zero (a dead unit); every statistic is 0 there.
        finite: False where the map holds NaN or infinite values (the model's values or gradients
            overflowed or divided by zero): every per-probe statistic is NaN there, and the map is left
            out of the means and of ``mean_areas``; it is not dead.
        mean_areas: (L, S): for the probes' mean map (of the finite maps), the fraction of the input that
            holds each of ``shares`` of its mass, pixels taken from the largest down (:func:`mass_areas`);
            NaN for a layer without a finite map.
        threshold: the fraction of the peak used for ``count``.
        mass: the fraction of the total used for ``mass_side``.
        shares: the shares of ``mean_areas``.
    """

    count: Tensor
    size: Tensor
    mass_side: Tensor
    rf_side: Tensor
    size_fraction: Tensor
    mass_fraction: Tensor
    dead: Tensor
    threshold: float
    mass: float
    extent: Tensor
    mean_areas: Tensor
    finite: Tensor
    shares: tuple[float, ...] = MASS_SHARES

    def mean(self) -> dict[str, Tensor]:
        """Each statistic averaged over the probes whose map is finite and alive, shape (L,); 0 where all
        finite maps are dead, NaN where no map is finite.

        Keys: ``count``, ``size``, ``mass_side``, ``rf_side``, ``size_fraction``, ``mass_fraction`` (the
        attributes above), ``extent`` (shape (L, d)), ``dead_fraction`` (the share of probes whose map is
        all zero), ``non_finite_fraction`` (the share whose map holds NaN or inf) and ``mean_area_<p>`` for
        each share ``p`` percent of :attr:`shares` (already per layer).
        """
        alive = (~self.dead & self.finite).to(self.size.dtype)
        counted = alive.sum(0)
        none_finite = ~self.finite.any(0)
        result = {}
        for name in ("count", "size", "mass_side", "rf_side", "size_fraction", "mass_fraction", "extent"):
            values = getattr(self, name)
            weights = alive if values.dim() == 2 else alive[..., None]
            total = torch.nan_to_num(values * weights).sum(0)  # NaN * 0 is NaN: a non-finite map weighs nothing
            alive_layers = counted if values.dim() == 2 else counted[..., None]
            mean = torch.where(alive_layers > 0, total / alive_layers.clamp(min=1), torch.zeros_like(total))
            unknown = none_finite if values.dim() == 2 else none_finite[..., None]
            result[name] = mean.masked_fill(unknown, math.nan)
        result["dead_fraction"] = self.dead.to(self.size.dtype).mean(0)
        result["non_finite_fraction"] = (~self.finite).to(self.size.dtype).mean(0)
        for index, share in enumerate(self.shares):
            result[mean_area_key(share)] = self.mean_areas[:, index]
        return result


def mean_area_key(share: float) -> str:
    """The :meth:`ERFStats.mean` key of a mass share: ``mean_area_50`` for 0.5.

    Example::
        >>> [mean_area_key(share) for share in MASS_SHARES]
        ['mean_area_20', 'mean_area_50', 'mean_area_99']
    """
    return f"mean_area_{100 * share:g}".replace(".", "_")


def check_threshold_and_mass(threshold: float, mass: float) -> tuple[float, float]:
    """The ERF thresholds if ``0 < threshold < 1`` and ``0 < mass <= 1``, else a ``ValueError``.

    Example::
        >>> check_threshold_and_mass(LUO_THRESHOLD, 0.95)
        (0.0455, 0.95)
    """
    if not 0 < threshold < 1 or not 0 < mass <= 1:
        raise ValueError(f"threshold={threshold}, mass={mass}: need 0 < threshold < 1 and 0 < mass <= 1.")
    return threshold, mass


def erf_stats(
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    threshold: float = LUO_THRESHOLD,
    mass: float = 0.95,
    shares: Sequence[float] = MASS_SHARES,
) -> ERFStats:
    """ERF statistics of saliency maps (N, L, *spatial), with the boxes (N, L, 2d) and centres (N, L, d).

    A map holding NaN or inf values gets NaN statistics and is left out of the means (``finite``).

    Example::
        >>> maps = torch.zeros(1, 2, 9, 9)
        >>> maps[0, 0, 3:6, 3:6] = 1.0  # a 3x3 plateau; the second map is dead
        >>> stats = erf_stats(maps, torch.tensor([[[0, 0, 9, 9]] * 2]), torch.tensor([[[4.0, 4.0]] * 2]))
        >>> stats.count.tolist(), stats.mass_side.tolist(), stats.dead.tolist(), stats.extent[0, 0].tolist()
        ([[9.0, 0.0]], [[3.0, 0.0]], [[False, True]], [3.0, 3.0])
    """
    maps = maps.float()
    count_probes, layers, *spatial = maps.shape
    dims = len(spatial)
    expand = (1,) * dims
    finite = finite_maps(maps)
    mean_map = finite_mean(maps, finite)
    if not bool(finite.all()):
        maps = torch.where(finite.view(count_probes, layers, *expand), maps, 0.0)  # their statistics are NaN below
    peak = maps.flatten(2).amax(2)
    dead = ~(peak > 0) & finite
    limit = threshold * peak.view(count_probes, layers, *expand)
    count = (maps > limit).flatten(2).sum(2).float()
    count = torch.where(dead, torch.zeros_like(count), count)
    size = _side(count, dims)

    # Per axis, the interval that bounds the pixels above the threshold (empty for a dead map).
    extents = []
    for axis, length in enumerate(spatial):
        others = tuple(2 + other for other in range(dims) if other != axis)
        along = (maps.amax(dim=others) if others else maps) > limit.flatten(2)  # (N, L, length): a pixel above it
        index = torch.arange(length)
        first = torch.where(along, index, length).amin(2)
        last = torch.where(along, index, -1).amax(2)
        extents.append((last - first + 1).clamp(min=0).float())
    extent = torch.stack(extents, dim=2)

    # A cube of side s centred on the unit's RF centre holds the pixels whose Chebyshev distance d
    # from it is at most (s - 1) / 2. Centres sit on whole or half pixels, so s = 2d + 1 is a whole
    # number: bucket the saliency by it and find the first side whose cumulative mass is enough.
    distance = None
    for axis, length in enumerate(spatial):
        shape = [1, 1, *expand]
        shape[2 + axis] = length
        coordinates = torch.arange(length, dtype=torch.float32).view(shape)
        offset = (coordinates - centers[..., axis].float().view(count_probes, layers, *expand)).abs()
        distance = offset if distance is None else torch.maximum(distance, offset)
    side = (2 * distance).round().long().flatten(2)  # side - 1
    buckets = maps.new_zeros(*side.shape[:2], int(side.max()) + 1).scatter_add_(2, side, maps.flatten(2))
    cumulative = buckets.cumsum(2)
    total = cumulative[..., -1:]
    first = (cumulative >= mass * total - 1e-6 * total).float().argmax(2)
    mass_side = (first + 1).float()
    mass_side = torch.where(dead, torch.zeros_like(mass_side), mass_side)

    volume = (boxes[..., dims:] - boxes[..., :dims]).clamp(min=0).prod(-1).float()
    rf_side = _side(volume, dims)
    reach = _reach(boxes, centers)
    zero = torch.zeros_like(size)
    unknown = ~finite

    def per_probe(values: Tensor) -> Tensor:
        return values.masked_fill(unknown if values.dim() == 2 else unknown[..., None], math.nan)

    return ERFStats(
        count=per_probe(count),
        size=per_probe(size),
        mass_side=per_probe(mass_side),
        rf_side=rf_side,
        size_fraction=per_probe(torch.where(rf_side > 0, size / rf_side.clamp(min=1), zero)),
        mass_fraction=per_probe(torch.where((volume > 0) & (reach > 0), mass_side / reach.clamp(min=1), zero)),
        dead=dead,
        threshold=threshold,
        mass=mass,
        extent=per_probe(extent),
        mean_areas=mass_areas(mean_map, shares),
        finite=finite,
        shares=tuple(shares),
    )


def finite_maps(maps: Tensor) -> Tensor:
    """(N, L) bool: whether each map of ``maps`` ``(N, L, *spatial)`` holds only finite values.

    One sum first: a NaN or an infinity anywhere makes it non-finite, so a finite sum (nearly always) needs no
    look at each value.

    Example::
        >>> finite_maps(torch.tensor([[[1.0, -2.0]], [[math.inf, 0.0]]])).tolist()
        [[True], [False]]
    """
    if bool(torch.isfinite(maps.sum())):
        return torch.ones(maps.shape[:2], dtype=torch.bool)
    return torch.isfinite(maps).flatten(2).all(2).cpu()


def finite_mean(maps: Tensor, finite: Tensor) -> Tensor:
    """The mean over probes of maps ``(N, L, *spatial)`` whose ``finite`` (N, L) is True: (L, *spatial), NaN
    for a layer without one.

    Example::
        >>> finite_mean(torch.tensor([[[1.0, 3.0]], [[math.nan, 0.0]]]), torch.tensor([[True], [False]])).tolist()
        [[1.0, 3.0]]
    """
    if bool(finite.all()):
        return maps.mean(0)
    expand = (1,) * (maps.dim() - 2)
    kept = torch.where(finite.view(*finite.shape, *expand), maps, 0.0)
    return kept.sum(0) / finite.sum(0).view(-1, *expand)


def _reach(boxes: Tensor, centers: Tensor) -> Tensor:
    """The side of the smallest cube centred on each centre (N, L, d) that holds its box (N, L, 2d), counted as
    ``mass_side`` counts: ``2 * distance + 1``, the distance to the farthest pixel of the box (Chebyshev).

    Example::
        >>> _reach(torch.tensor([[[0, 0, 9, 9], [0, 0, 9, 4]]]), torch.tensor([[[4.0, 4.0], [4.0, 0.0]]])).tolist()
        [[9.0, 9.0]]
    """
    dims = centers.shape[-1]
    lows, lasts = boxes[..., :dims].float(), boxes[..., dims:].float() - 1
    distance = torch.maximum(centers.float() - lows, lasts - centers.float()).amax(-1)
    return (2 * distance).round() + 1


def _side(volume: Tensor, dims: int) -> Tensor:
    """The side of a ``dims``-cube of each ``volume`` (in float64 first, so that 27 voxels give 3.0 exactly)."""
    if dims == 2:
        return volume.sqrt()
    return volume.double().pow(1.0 / dims).float()


def mass_areas(maps: Tensor, shares: Sequence[float] = MASS_SHARES) -> Tensor:
    """For each map (L, *spatial), the fraction of its pixels, largest first, that holds each share of its mass.

    A compact map (a peak) needs few pixels, a flat one many: for a uniform map, a share ``p`` of the
    mass needs a share ``p`` of the pixels. An all-zero map gives 0, a map holding NaN or inf NaN.

    Returns:
        float32 (L, len(shares)), each in (0, 1].

    Example::
        >>> maps = torch.zeros(2, 10)
        >>> maps[0, 3] = 1.0  # all the mass in one pixel out of ten
        >>> maps[1] = 1.0  # uniform
        >>> mass_areas(maps, (0.2, 0.5, 0.99)).tolist()
        [[0.10000000149011612, 0.10000000149011612, 0.10000000149011612], [0.20000000298023224, 0.5, 1.0]]
    """
    flat = maps.float().flatten(1)
    fractions = torch.zeros(len(flat), len(shares))
    for row, values in enumerate(flat):  # only the nonzero pixels are sorted: shallow layers' maps are small
        if not torch.isfinite(values).all():
            fractions[row] = math.nan
            continue
        values = values[values > 0].sort(descending=True).values
        if len(values):
            cumulative = values.cumsum(0)
            total = cumulative[-1]
            wanted = torch.tensor(shares, dtype=cumulative.dtype) * total - 1e-6 * total
            fractions[row] = (torch.searchsorted(cumulative, wanted) + 1).clamp(max=len(values)).float() / flat.shape[1]
    return fractions
