"""Command line: ``rf-callback table MODEL`` and ``rf-callback compare CKPT ...``.

Parses arguments, calls the library and prints; bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class CommandError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def import_object(path: str) -> Any:
    """``package.module:Name`` or ``package.module.Name`` → the object.

    Example::
        >>> import_object("collections:OrderedDict").__name__
        'OrderedDict'
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise CommandError(
            f"'{path}' is not an importable name. HINT: write package.module:Name or package.module.Name."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandError(f"cannot import module '{module_name}' (from '{path}'): {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise CommandError(f"module '{module_name}' has no attribute '{attribute}' (from '{path}').") from None


def build_model(path: str) -> Any:
    """Call the factory or class at ``path`` with no arguments, on the meta device when it allows."""
    import torch

    factory = import_object(path)
    if not callable(factory):
        raise CommandError(f"'{path}' is not a model class or factory (it is a {type(factory).__name__}).")
    try:
        with torch.device("meta"):  # no memory and no weight initialisation
            model = factory()
    except Exception:  # noqa: BLE001 - some constructors compute with tensors; build them for real
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"'{path}()' returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _table(args: argparse.Namespace) -> int:
    from rf_callback.fields import receptive_fields
    from rf_callback.report import format_rows

    model = build_model(args.model)
    try:
        table = receptive_fields(model, args.input_shape, strict=args.strict)
    except ValueError as error:
        raise CommandError(str(error)) from error
    records = [row.to_record() for row in table.values()]
    if args.json:
        layers = ",\n".join(f"    {json.dumps(record)}" for record in records)
        print(
            f'{{\n  "model": {json.dumps(args.model)},\n  "input_shape": {list(table.input_shape)},\n'
            f'  "layers": [\n{layers}\n  ]\n}}'
        )
    else:
        print(format_rows(records, markdown=args.markdown))
    return 0


def _unit(text: str) -> str | tuple[int, int]:
    """``center``, ``max`` or ``i,j``.

    Example::
        >>> _unit("max"), _unit("3,4")
        ('max', (3, 4))
    """
    if text in ("center", "max"):
        return text
    i, _, j = text.partition(",")
    if not (i.strip().isdigit() and j.strip().isdigit()):
        raise CommandError(f"--unit {text}: choose center, max or a unit position i,j (e.g. 3,4).")
    return int(i), int(j)


def _compare(args: argparse.Namespace) -> int:
    from rf_callback.compare import CompareError, compare_checkpoints, write_comparison

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
    table.add_argument("--strict", action="store_true", help="fail at the first unsupported layer")
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
        help="a torch.save'd tensor (N, C, H, W), a checkpoint with ReceptiveFieldMonitor state, or fashion-mnist"
        " (default: the first checkpoint's ReceptiveFieldMonitor probes, else fashion-mnist)",
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
    except CommandError as error:
        print(f"rf-callback {args.command}: error: {error}", file=sys.stderr)
        return 2
