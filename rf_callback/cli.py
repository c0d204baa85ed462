"""Command line: ``rf-callback table MODEL`` and ``rf-callback compare CKPT ...``.

Parses arguments, calls the library and prints; bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"rf-callback {args.command}: error: {error}", file=sys.stderr)
        return 2
