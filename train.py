"""Train a Fashion-MNIST classifier with Lightning's command line, then test it and say where the logs are.

Usage::

    python train.py                                   # configs/default.yaml: SmallCNN, 5 epochs
    python train.py --config configs/residual.yaml --trainer.max_epochs 3 --data.data_dir /tmp/data
    python train.py --print_config                    # the full configuration, every option with its value
    python train.py --help

``configs/default.yaml`` is always read first; ``--config`` files and flags override it. Logs go to
TensorBoard under ``lightning_logs/<name>/version_<n>``; ``tensorboard --logdir lightning_logs``
shows every run side by side, named ``<name>/version_<n>``, with the checkpoint and the configuration used.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from rf_callback.demos.cnns import FashionMNISTClassifier
from rf_callback.demos.fashion_mnist import FashionMNISTDataModule, FashionMNISTNotFoundError, IdxFormatError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main() -> None:
    cli = LightningCLI(
        FashionMNISTClassifier,
        FashionMNISTDataModule,
        subclass_mode_model=True,
        run=False,
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
    )
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except (FashionMNISTNotFoundError, IdxFormatError, MisconfigurationException) as error:
        # Each message says what was asked, what was found and how to fix it (the data files and every
        # place searched; a callback's bad argument): Lightning's call chain above it would add nothing.
        sys.exit(f"train.py: {error}")
    cli.trainer.test(cli.model, datamodule=cli.datamodule)

    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        print(f"Checkpoint: {checkpoint.best_model_path}")
    loggers = [logger for logger in cli.trainer.loggers if isinstance(logger, TensorBoardLogger)]
    for logger in loggers:
        print(f"TensorBoard logs: {logger.log_dir}")
        # the root holds every run as <config name>/version_<n>, so runs compare side by side
        print(f"View them with:   tensorboard --logdir {shlex.quote(str(logger.save_dir))}")
    if not loggers:
        print("No TensorBoard logs were written: trainer.logger is off (fast_dev_run turns it off too).")


if __name__ == "__main__":
    main()
