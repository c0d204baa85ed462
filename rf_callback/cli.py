"""Command line: rf-callback table MODEL and rf-callback compare CKPT ...

Parses arguments, calls the library and prints; bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import pkgutil
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class CommandError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def import_object(path: str) -> Any:
    """``package.module:Name`` or ``package.module.Name`` -> the object (``pkgutil.resolve_name``).

    The current directory is importable, as with ``python -m``.

    Example::
        >>> import_object("collections:OrderedDict").__name__
        'OrderedDict'
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return pkgutil.resolve_name(path)
    except ModuleNotFoundError as error:
        raise CommandError(
            f"cannot import '{path}': {error}. HINT: run from the folder that holds the module, install its package,"
            " or write package.module:Name."
        ) from None
    except (ImportError, AttributeError, ValueError) as error:
        raise CommandError(f"cannot import '{path}': {error}. HINT: write package.module:Name.") from None


def parse_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs as keyword arguments; values are Python literals, else strings.

    Example::
        >>> parse_kwargs(["num_classes=10", "weights=None", "name=tiny"])
        {'num_classes': 10, 'weights': None, 'name': 'tiny'}
    """
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CommandError(f"--kwargs {pair}: write key=value, e.g. --kwargs num_classes=10 weights=None.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def build_model(path: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Call the factory or class at ``path`` with ``kwargs``, on the meta device when it allows.

    torchvision builders get ``weights=None`` (and ``weights_backbone=None``) unless given: nothing is
    downloaded.
    """
    import inspect

    import torch

    factory = import_object(path)
    if not callable(factory) or isinstance(factory, type) and not issubclass(factory, torch.nn.Module):
        raise CommandError(f"'{path}' is not a model class or factory (it is {type(factory).__name__} {factory!r}).")
    kwargs = dict(kwargs or {})
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    for name in ("weights", "weights_backbone"):
        if name in parameters and name not in kwargs:
            kwargs[name] = None
    try:
        try:
            with torch.device("meta"):  # no memory and no weight initialisation
                model = factory(**kwargs)
        except TypeError:
            raise
        except Exception:  # noqa: BLE001 - some constructors compute with tensors; build them for real
            model = factory(**kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to build is said in one line
        raise CommandError(
            f"cannot build '{path}' with {kwargs or 'no arguments'}: {type(error).__name__}: {error}. HINT: pass"
            " constructor arguments with --kwargs key=value."
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"'{path}(...)' returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _table(args: argparse.Namespace) -> int:
    from rf_callback.cost import unproductive_cost
    from rf_callback.errors import TraceError
    from rf_callback.report import csv_text, format_rows
    from rf_callback.table import receptive_fields

    if not 2 <= len(args.input_shape) <= 4:
        raise CommandError(
            f"--input-shape {' '.join(map(str, args.input_shape))}: give C H W for images (C L for 1-D, C D H W for"
            " 3-D), without the batch."
        )
    model = build_model(args.model, parse_kwargs(args.kwargs))
    try:
        table = receptive_fields(model, args.input_shape, strict=args.strict)
    except (ValueError, TraceError) as error:
        raise CommandError(" ".join(str(error).split())) from None
    rows = [row for row in table.values() if args.all or _shown(row, args.layers, args.types)]
    records = [row.to_record() for row in rows]
    cost = unproductive_cost(model, table)  # of the whole model, whichever rows are shown
    if args.json:
        unproductive = {"layers": list(cost.layers), "parameters": cost.parameters, "macs": cost.macs}
        totals = {"parameters": cost.total_parameters, "macs": cost.total_macs}
        print(
            json.dumps(
                {
                    "model": args.model,
                    "input_shape": list(table.input_shape),
                    "layers": records,
                    "unproductive": unproductive,
                    "total": totals,
                },
                indent=2,
            )
        )
    elif args.csv:
        print(csv_text(records), end="")
    else:
        print(format_rows(records, markdown=args.markdown))
        print(f"\n{cost.describe()}")
    return 0


ELEMENTWISE = {
    "ReLU",
    "ReLU6",
    "GELU",
    "SiLU",
    "Hardswish",
    "Hardsigmoid",
    "Sigmoid",
    "Tanh",
    "LeakyReLU",
    "Identity",
    "Dropout",
    "Dropout2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "StochasticDepth",
    "DropPath",
}
"""Module types hidden by default: they never change a receptive field."""


def _shown(row: Any, layers: Sequence[str] | None, types: Sequence[str] | None) -> bool:
    if layers and not any(fnmatch.fnmatchcase(row.name, pattern) for pattern in layers):
        return False
    if types:
        return row.module_type in types
    return row.module_type not in ELEMENTWISE


def _unit(text: str) -> str | tuple[int, int]:
    """``center``, ``max`` or ``i,j``.

    Example::
        >>> _unit("max"), _unit("3,4")
        ('max', (3, 4))
    """
    if text in ("center", "centre", "max"):
        return text
    i, _, j = text.partition(",")
    if not (i.strip().isdigit() and j.strip().isdigit()):
        raise CommandError(f"--unit {text}: choose center, max or a unit position i,j (e.g. 3,4).")
    return int(i), int(j)


def _compare(args: argparse.Namespace) -> int:
    from rf_callback.compare import compare_checkpoints
    from rf_callback.errors import CompareError
    from rf_callback.export import write_comparison

    model_class = import_object(args.model) if args.model else None
    unit = _unit(args.unit) if args.unit is not None else None
    try:
        comparison = compare_checkpoints(
            args.checkpoints,
            model_class=model_class,
            layers=args.layers,
            unit=unit,
            channel=args.channel,
            probes=args.probes,
        )
        written = write_comparison(comparison, args.out, tensorboard=args.tensorboard)
    except CompareError as error:
        raise CommandError(str(error)) from error
    count = len(comparison.checkpoints)
    print(f"{count} checkpoint{'s' * (count > 1)}, {len(comparison.probes)} probes ({comparison.probe_origin}):\n")
    print(comparison.format_table())
    print("\nWrote:", *written, sep="\n  ")
    if args.tensorboard is not None:
        print(f"View the TensorBoard run with: tensorboard --logdir {shlex.quote(str(args.tensorboard))}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rf-callback", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser("table", help="print the receptive field of every layer of a model")
    table.add_argument("model", help="an importable model class or factory, e.g. torchvision.models.resnet50")
    table.add_argument("--input-shape", type=int, nargs="+", required=True, metavar="N", help="C H W (no batch)")
    output = table.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable JSON")
    output.add_argument("--markdown", action="store_true", help="a Markdown table")
    output.add_argument("--csv", action="store_true", help="comma-separated values, a column per field")
    table.add_argument("--strict", action="store_true", help="fail at the first unsupported layer")
    table.add_argument("--kwargs", nargs="+", default=[], metavar="KEY=VALUE", help="arguments for the factory")
    table.add_argument("--layers", nargs="+", metavar="PATTERN", help="only rows whose name matches (glob)")
    table.add_argument("--types", nargs="+", metavar="TYPE", help="only rows of these module types, e.g. Conv2d")
    table.add_argument("--all", action="store_true", help="every row, BatchNorm, activations and dropout included")
    table.set_defaults(run=_table)

    compare = commands.add_parser(
        "compare", help="receptive maps and ERF statistics of several checkpoints side by side"
    )
    compare.add_argument("checkpoints", nargs="+", metavar="CKPT", help="Lightning checkpoint files, in order")
    compare.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and tables")
    compare.add_argument(
        "--model", metavar="CLASS", help="the LightningModule, package.module:Class (default: named in the checkpoint)"
    )
    compare.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="layers to compare, after the checkpoints (default: those all checkpoints share)",
    )
    compare.add_argument(
        "--unit", metavar="UNIT", help="center, max or i,j (default: the ReceptiveFieldMonitor's, else center)"
    )
    compare.add_argument("--channel", type=int, metavar="C", help="one channel of the unit (default: all, summed)")
    compare.add_argument(
        "--probes",
        metavar="FILE",
        help="a torch.save'd tensor (N, C, H, W) or a checkpoint with ReceptiveFieldMonitor state"
        " (default: the first checkpoint's ReceptiveFieldMonitor probes)",
    )
    compare.add_argument(
        "--tensorboard", metavar="DIR", help="also write a TensorBoard run there, a step per checkpoint"
    )
    compare.set_defaults(run=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        sys.stderr.close()
        return 0
    except CommandError as error:
        print(f"rf-callback {args.command}: error: {error}", file=sys.stderr)
        return 2
