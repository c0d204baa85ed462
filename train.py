"""Train a Fashion-MNIST classifier with Lightning's command line, then test it and say where the logs are.

Usage::

    python train.py                                   # configs/default.yaml: SmallCNN, 5 epochs
    python train.py --config configs/residual.yaml --trainer.max_epochs 3 --data.data_dir /tmp/data
    python train.py --print_config                    # the full configuration, every option with its value
    python train.py --help

``configs/default.yaml`` is always read first; ``--config`` files and flags override it. Logs go to
TensorBoard under ``lightning_logs/<name>/version_<n>``, with the checkpoint and the configuration used.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from rf_callback.demos.fashion_mnist import FashionMNISTDataModule
from rf_callback.demos.cnns import FashionMNISTClassifier

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main() -> None:
    cli = LightningCLI(
        FashionMNISTClassifier,
        FashionMNISTDataModule,
        subclass_mode_model=True,
        run=False,
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)

    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        print(f"Checkpoint: {checkpoint.best_model_path}")
    log_dirs = [logger.log_dir for logger in cli.trainer.loggers if isinstance(logger, TensorBoardLogger)]
    for log_dir in log_dirs:
        print(f"TensorBoard logs: {log_dir}")
        print(f"View them with:   tensorboard --logdir {shlex.quote(log_dir)}")
    if not log_dirs:
        print("No TensorBoard logs were written: trainer.logger is off (fast_dev_run turns it off too).")


if __name__ == "__main__":
    main()
