"""rf_callback: where a convolutional network looks, from the first batch to the last epoch.

* :func:`receptive_fields` — the analytic receptive field of every layer (size, effective stride,
  effective padding, the exact input box of any unit), traced on the meta device.
* :func:`receptive_maps` — gradient-saliency maps of chosen units (the effective receptive field)
  and their statistics, for a batch of probe images.
* :class:`ProbeMonitor` — both for fixed probes, logged at any step, from any training loop.
* :class:`ReceptiveFieldMonitor` — the Lightning callback over it.

Names are imported on first use, so ``import rf_callback`` stays light and the pure algebra in
:mod:`rf_callback.algebra` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AxisRF": "rf_callback.algebra",
    "Field": "rf_callback.algebra",
    "MisalignedBranchesError": "rf_callback.errors",
    "TraceError": "rf_callback.errors",
    "UnsupportedLayerError": "rf_callback.errors",
    "LayerRF": "rf_callback.table",
    "ReceptiveFieldTable": "rf_callback.table",
    "receptive_fields": "rf_callback.table",
    "unwrap_model": "rf_callback.table",
    "ERFStats": "rf_callback.erf",
    "ReceptiveMaps": "rf_callback.saliency",
    "receptive_maps": "rf_callback.saliency",
    "ReceptiveFieldMonitor": "rf_callback.callback",
    "ProbeMonitor": "rf_callback.monitor",
    "Probes": "rf_callback.probes",
    "probes_from_dataset": "rf_callback.probes",
    "LayerKey": "rf_callback.table",
    "CompareError": "rf_callback.errors",
    "CheckpointError": "rf_callback.errors",
    "unproductive_cost": "rf_callback.cost",
}

__all__ = [
    "AxisRF",
    "CheckpointError",
    "CompareError",
    "ERFStats",
    "Field",
    "LayerKey",
    "LayerRF",
    "MisalignedBranchesError",
    "ProbeMonitor",
    "Probes",
    "ReceptiveFieldMonitor",
    "ReceptiveFieldTable",
    "ReceptiveMaps",
    "TraceError",
    "UnsupportedLayerError",
    "probes_from_dataset",
    "receptive_fields",
    "receptive_maps",
    "unproductive_cost",
    "unwrap_model",
]

if TYPE_CHECKING:
    from rf_callback.algebra import AxisRF, Field
    from rf_callback.callback import ReceptiveFieldMonitor
    from rf_callback.cost import unproductive_cost
    from rf_callback.erf import ERFStats
    from rf_callback.errors import (
        CheckpointError,
        CompareError,
        MisalignedBranchesError,
        TraceError,
        UnsupportedLayerError,
    )
    from rf_callback.monitor import ProbeMonitor
    from rf_callback.probes import Probes, probes_from_dataset
    from rf_callback.saliency import ReceptiveMaps, receptive_maps
    from rf_callback.table import LayerKey, LayerRF, ReceptiveFieldTable, receptive_fields, unwrap_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rf_callback' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
