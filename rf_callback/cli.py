"""Command line: rf-callback table MODEL and rf-callback compare CKPT ...

Parses arguments, calls the library and prints; bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import pkgutil
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType
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
    except Exception as error:  # noqa: BLE001 - the module's own code may raise anything: said in one line
        raise CommandError(f"cannot import '{path}': {_import_problem(path, error)}") from None


def _import_problem(path: str, error: Exception) -> str:
    """What was wrong with ``path``, with close matches where there are some.

    Example::
        >>> try:
        ...     pkgutil.resolve_name("collections.OrderdDict")
        ... except AttributeError as error:
        ...     print(_import_problem("collections.OrderdDict", error))
        module 'collections' has no attribute 'OrderdDict'. Did you mean: OrderedDict, UserDict?
    """
    dotted = path.replace(":", ".")
    if isinstance(error, ModuleNotFoundError) and error.name and f"{dotted}.".startswith(f"{error.name}."):
        parent_name, _, leaf = error.name.rpartition(".")
        parent = sys.modules.get(parent_name)
        names = [m.name for m in pkgutil.iter_modules(parent.__path__)] if hasattr(parent, "__path__") else []
        if not parent_name:
            return (
                f"there is no module '{leaf}' here. HINT: give the full path, package.module.Name (e.g."
                " torchvision.models.resnet18), from the folder that holds the module or with its package installed."
            )
        return f"package '{parent_name}' has no module '{leaf}'.{_did_you_mean(leaf, names)}"
    if isinstance(error, AttributeError) and getattr(error, "name", None) is not None:
        owner = getattr(error, "obj", None)
        where = f"module '{owner.__name__}'" if isinstance(owner, ModuleType) else f"'{type(owner).__name__}'"
        names = [name for name in dir(owner) if not name.startswith("_")]
        return f"{where} has no attribute '{error.name}'.{_did_you_mean(error.name, names)}"
    if isinstance(error, ValueError) and "invalid format" in str(error):
        return "not a Python name. HINT: write package.module.Name or package.module:Name."
    return f"importing it failed: {type(error).__name__}: {' '.join(str(error).split())}"


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


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
    records = [row.to_record() for row in _rows(table, args.layers, args.types, args.all)]
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


def _rows(table: Any, layers: Sequence[str] | None, types: Sequence[str] | None, every: bool) -> list[Any]:
    """The rows to print: those whose name (or module name: ``relu`` for ``relu[0]``) matches one of the ``layers``
    patterns (all rows without any), of one of the ``types`` (any type without any), less the elementwise ones
    unless ``every`` or ``types`` asks for them.

    Raises:
        CommandError: for a pattern or type that matches no row (with close matches), or filters that leave no
            row together.
    """
    from rf_callback.table import LayerKey

    rows = list(table.values())
    names = [row.name for row in rows]

    def matches(name: str, pattern: str) -> bool:  # the row's key or its module's name: relu matches relu[0], relu[1]
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(LayerKey.parse(name).module, pattern)

    for pattern in layers or ():
        if not any(matches(name, pattern) for name in names):
            raise CommandError(
                f"--layers {pattern}: no layer matches.{_did_you_mean(pattern, names)} HINT: names are"
                " model.named_modules() paths (glob patterns such as 'layer4*'); --json lists them all."
            )
    kinds = list(dict.fromkeys(row.module_type for row in rows))
    for kind in types or ():
        if kind not in kinds:
            raise CommandError(
                f"--types {kind}: no layer of that type.{_did_you_mean(kind, kinds)} Types here: {', '.join(kinds)}."
            )
    chosen = [
        row
        for row in rows
        if (not layers or any(matches(row.name, pattern) for pattern in layers))
        and (not types or row.module_type in types)
    ]
    if not chosen:
        raise CommandError(
            f"--layers {' '.join(layers or ())} --types {' '.join(types or ())}: no layer matches both. HINT: drop"
            " one of them, or widen it."
        )
    shown = chosen if every or types else [row for row in chosen if row.module_type not in ELEMENTWISE]
    if not shown:
        hidden = ", ".join(dict.fromkeys(row.module_type for row in chosen))
        raise CommandError(
            f"--layers {' '.join(layers or ())}: matches only rows hidden by default ({hidden}: they never change a"
            " receptive field). HINT: add --all to show them."
        )
    return shown


def _unit(text: str) -> str | tuple[int, int]:
    """``center`` (or ``centre``), ``max``, ``max_logit`` or ``i,j``.

    Example::
        >>> _unit("max_logit"), _unit("3,4")
        ('max_logit', (3, 4))
    """
    if text in ("center", "centre", "max", "max_logit"):
        return text
    i, _, j = text.partition(",")
    if not (i.strip().isdigit() and j.strip().isdigit()):
        raise CommandError(
            f"--unit {text}: choose center (or centre), max, max_logit or a unit position i,j (e.g. 3,4)."
        )
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
            import_class=args.import_class,
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
    table.add_argument(
        "--layers", nargs="+", metavar="PATTERN", help="only rows whose name (or module's name) matches (glob)"
    )
    table.add_argument("--types", nargs="+", metavar="TYPE", help="only rows of these module types, e.g. Conv2d")
    table.add_argument(
        "--all", action="store_true", help="also the rows hidden by default: BatchNorm, activations, dropout"
    )
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
        "--import-class",
        action="store_true",
        help="import the module of the class the checkpoint names (runs its code: only for files you trust)",
    )
    compare.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="layers to compare, after the checkpoints (default: those all checkpoints share)",
    )
    compare.add_argument(
        "--unit",
        metavar="UNIT",
        help="center, max, max_logit or i,j (default: the ReceptiveFieldMonitor's, else center)",
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
