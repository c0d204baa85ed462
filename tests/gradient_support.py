"""The oracle of the transformer and zoo-defect tests: every row's boxes against the gradient support.

With float64 weights and no dead activations, the input pixels whose gradient is nonzero for a unit
are the pixels with a path to it, and their bounding box must equal ``box`` of that unit. A unit is
every element of the row's output at its position (``element_positions`` of the row's layout: NCHW,
channels-last, tokens, windows), mixed with random weights (the plain channel sum of a LayerNorm's
output is a constant). So a row called global is held to it unit by unit: a mask unit's tokens that
see only their mask unit fail (hiera_tiny_224's ``blocks.1`` did), where the sum of the whole output
would see everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rf_callback import receptive_fields
from rf_callback.tracing import element_positions


def support(value: torch.Tensor, image: torch.Tensor) -> tuple[int, ...] | None:
    """The bounding box ``(top, left, ..., bottom, right, ...)`` of the pixels where ``value``'s gradient is nonzero."""
    (gradient,) = torch.autograd.grad(value, image, retain_graph=True)
    reached = gradient[0].ne(0).any(0).nonzero()
    if len(reached) == 0:
        return None
    return (*reached.min(0).values.tolist(), *(reached.max(0).values + 1).tolist())


def assert_rows_match_gradient_support(
    model: nn.Module,
    shape: tuple[int, ...],
    names: Sequence[str] | None = None,
    every: int = 1,
    strict: bool = True,
    reinitialize: bool = True,
) -> int:
    """Every ``every``-th unit of each row (``names``, default all the model's modules) has the box of its gradient
    support. Returns the units checked.

    ``reinitialize`` draws every parameter from N(0, 1) first (no zero-initialized head, no unit
    LayerNorm scale); otherwise the model's own initialization is kept.
    """
    torch.manual_seed(0)
    model = model.double().eval()
    if reinitialize:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_()
    table = receptive_fields(model, shape, strict=strict)
    modules = dict(model.named_modules())
    names = [key for key in table if key in modules] if names is None else list(names)
    outputs = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n in names]
    image = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name in names:
        row, output = table[name], outputs[name]
        if not isinstance(output, torch.Tensor) or not row.supported:
            continue
        assert tuple(output.shape) == tuple(row.tensor_shape), name
        positions = element_positions(row.layout, row.tensor_shape, len(shape) - 1)
        weights = torch.rand(output.shape, generator=generator, dtype=output.dtype)
        units = list(
            torch.cartesian_prod(*(torch.arange(n) for n in row.output_shape)).reshape(-1, len(row.output_shape))
        )
        for unit in units[::every]:
            where = (positions == unit.reshape(-1, *[1] * output.dim())).all(0)
            assert where.any(), (name, unit.tolist())
            found = support((output * weights)[where].sum(), image)
            assert row.box(*unit.tolist()) == found, (name, unit.tolist(), row.field.rfs)
            checked += 1
    return checked
