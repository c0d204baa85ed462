"""What the layers a receptive-field table marks unproductive cost: parameters and multiply-adds.

Richter et al. ("Should You Go Deeper?", ICMLA 2021) predict from the architecture and the input size
alone which layers cannot add context (:attr:`~rf_callback.table.LayerRF.verdict`); this module says
what they cost, so that the prediction reads as a budget: how many parameters, and what share of a
forward's multiply-adds, sit in layers whose inputs already see the whole image.

Multiply-adds are counted for convolution and linear modules from the shapes the trace saw (a
convolution's weight times its output positions, a transposed one's times its input positions), so
no forward runs; matrix products written as functions in a ``forward`` (attention) are not counted,
in the unproductive layers nor in the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from rf_callback.table import LayerKey, LayerRF, ReceptiveFieldTable, named_modules, unwrap_model

__all__ = ["Cost", "layer_macs", "unproductive_cost"]


@dataclass(frozen=True)
class Cost:
    """The parameters and multiply-adds of some layers, against the whole model's.

    Attributes:
        layers: the rows, in call order, whose modules hold weights (convolutions, linear layers):
            the ones to name; BatchNorm and other rows are counted, not named.
        parameters: the parameters of the modules whose every call is among the rows (each once).
        total_parameters: every parameter of the model (each once).
        macs: multiply-adds of the convolution and linear calls among the rows, for one input.
        total_macs: multiply-adds of every convolution and linear call of the forward.
        input_shape: the input the table was traced at, without the batch.
        widest: the row whose smallest field over paths spans the most of the input (global rows left
            out), and that field; None where no row has one.
        unproductive: the unproductive rows that compute a field (:meth:`~ReceptiveFieldTable.computing`),
            weighted or not: named where no weighted layer is (a pooling past the border).

    Example::
        >>> from rf_callback import receptive_fields
        >>> net = nn.Sequential(*(nn.Conv2d(1, 1, 5, padding=2, bias=False) for _ in range(3)))
        >>> cost = unproductive_cost(net, receptive_fields(net, (1, 8, 8)))
        >>> cost.layers, cost.parameters, cost.total_parameters, cost.macs, cost.total_macs
        (('2',), 25, 75, 1600, 4800)
        >>> text = cost.describe()
        >>> text.split(" (")[0]
        'At 8x8, 1 layer is unproductive'
        >>> text.split(". ")[-1]
        'It holds 25 of 75 parameters (33.3%) and 33.3% of the multiply-adds of a forward.'
    """

    layers: tuple[str, ...]
    parameters: int
    total_parameters: int
    macs: int
    total_macs: int
    input_shape: tuple[int, ...]
    widest: tuple[str, tuple[int, ...]] | None = None
    unproductive: tuple[str, ...] = ()

    def describe(self, most: int = 6) -> str:
        """One sentence: which layers, what they hold, what share of a forward they compute (``most`` names at most)."""
        size = "x".join(map(str, self.input_shape[1:]))
        if not self.layers and not self.unproductive:
            if self.widest is None:
                return f"At {size}, no layer is predicted unproductive (Richter et al. 2021)."
            name, field = self.widest
            return (
                f"At {size}, no layer is predicted unproductive (Richter et al. 2021): the widest shortest path of a"
                f" layer that is not global spans {'x'.join(map(str, field))} ({name})."
            )
        shown = self.layers or self.unproductive
        count = len(shown)
        names = ", ".join(shown[:most]) + (f" and {count - most} more" if count > most else "")
        share = f"{100 * self.macs / self.total_macs:.1f}%" if self.total_macs else "none"
        return (
            f"At {size}, {count} layer{'s are' if count != 1 else ' is'} unproductive (Richter et al. 2021: "
            f"{'their' if count != 1 else 'its'} shortest path and {'their' if count != 1 else 'its'} inputs' already"
            f" see the whole input): {names}. {'They hold' if count != 1 else 'It holds'}"
            f" {_count(self.parameters)} of {_count(self.total_parameters)} parameters"
            f" ({100 * self.parameters / max(self.total_parameters, 1):.1f}%) and {share} of the multiply-adds of a"
            " forward."
        )


def _count(n: int) -> str:
    """``n`` for people: ``11.69M``, ``25.6k``, ``75``."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def layer_macs(module: nn.Module, row: LayerRF) -> int:
    """Multiply-adds of one call of a convolution or linear ``module`` whose output ``row`` describes; 0 for others.

    Example::
        >>> from rf_callback import receptive_fields
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1))
        >>> layer_macs(net[0], receptive_fields(net, (3, 32, 32))["0"])  # 8 * 3 * 3 * 3 weights, 16 * 16 positions
        55296
    """
    shape = tuple(row.tensor_shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        count = len(module.kernel_size)
        inputs = [  # each input position adds its weights once
            (n + 2 * p - d * (k - 1) - 1 - o) // s + 1
            for n, p, d, k, o, s in zip(
                shape[-count:],
                module.padding,
                module.dilation,
                module.kernel_size,
                module.output_padding,
                module.stride,
            )
        ]  # (a padding given as a string is refused by PyTorch for transposed convolutions)
        return module.weight.numel() * math.prod(inputs) * math.prod(shape[: -count - 1])
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.numel() * math.prod(shape[2:]) * shape[0]
    if isinstance(module, nn.Linear):
        return module.weight.numel() * math.prod(shape[:-1])
    return 0


def unproductive_cost(model: nn.Module, table: ReceptiveFieldTable) -> Cost:
    """What the rows of ``table`` that are unproductive (:meth:`ReceptiveFieldTable.unproductive`) cost in ``model``.

    A module counts when every call of it is unproductive; containers count through the modules
    inside them. ``model`` is the one ``table`` was traced from (its parameters may be on the meta device).
    """
    model = unwrap_model(model)
    modules = dict(named_modules(model))
    calls: dict[str, list[LayerRF]] = {}
    for key, row in table.items():
        calls.setdefault(LayerKey.parse(key).module_name, []).append(row)
    leaves = {name: module for name, module in modules.items() if name in calls and not next(module.children(), None)}
    unproductive = {name for name, rows in calls.items() if all(row.verdict == "unproductive" for row in rows)}
    total_macs = macs = 0
    named = []
    for key, row in table.items():
        name = LayerKey.parse(key).module_name
        module = leaves.get(name)
        if module is None:
            continue
        work = layer_macs(module, row)
        total_macs += work
        if row.verdict == "unproductive":
            macs += work
            if work and name in unproductive:
                named.append(key)
    seen: set[int] = set()  # shared parameters once
    parameters = 0
    for name in unproductive & leaves.keys():
        for parameter in leaves[name].parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                parameters += parameter.numel()
    total = sum(p.numel() for p in model.parameters())  # each shared parameter once
    spatial = table.input_shape[1:]
    computing = [table[key] for key in table.computing()]  # not a container or BatchNorm that passes it on
    judged = [(row.name, row.min_size) for row in computing if row.verdict not in ("global", "unknown")]
    widest = max(judged, key=lambda item: min(n / length for n, length in zip(item[1], spatial)), default=None)
    marked = tuple(key for key in table.computing() if table[key].verdict == "unproductive")
    return Cost(tuple(named), parameters, total, macs, total_macs, tuple(table.input_shape), widest, marked)
