"""The tracer behind :func:`rf_callback.receptive_fields`.

The model runs on the meta device under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that follows every ATen operation. Each tensor that depends on the input carries a
:class:`~rf_callback.algebra.Field` and a *layout*: which of its dimensions hold which input axis.
A registry maps each spatial operation to its geometry (kernel, stride, padding, dilation);
elementwise operations merge fields; anything else that touches the input's positions is
reported as unsupported, never guessed.

* :mod:`~rf_callback.tracing.layout`: layouts, :class:`Traced`, refusals;
* :mod:`~rf_callback.tracing.shortcuts`: meta outputs without Python meta kernels;
* :mod:`~rf_callback.tracing.ops`: the operation handlers and their registry;
* :mod:`~rf_callback.tracing.fast`: the commonest functions lowered to their ATen operation, so
  that they skip the dispatcher;
* :mod:`~rf_callback.tracing.engine`: the dispatch mode that runs them.
"""

from rf_callback.tracing.engine import FunctionInterceptor, TensorInfos, Tracer
from rf_callback.tracing.fast import module_lowering, run_module_lowered
from rf_callback.tracing.layout import (
    GridDims,
    Layout,
    Traced,
    Unsupported,
    axis_length,
    element_positions,
    grid_dims,
    refusal,
    spread_refusal,
)
from rf_callback.tracing.shortcuts import flat_tensors

__all__ = [
    "FunctionInterceptor",
    "GridDims",
    "Layout",
    "TensorInfos",
    "Traced",
    "Tracer",
    "Unsupported",
    "axis_length",
    "element_positions",
    "flat_tensors",
    "grid_dims",
    "module_lowering",
    "refusal",
    "run_module_lowered",
    "spread_refusal",
]
