"""Lightning's loggers as destinations: each logger attached to a Trainer gets all it can hold."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from rf_callback.destinations import (
    Destination,
    MetricsDestination,
    MLflowDestination,
    PngFolderDestination,
    TensorBoardDestination,
    WandbDestination,
)
from rf_callback.monitor import DESCRIPTIONS, TAG

__all__ = ["destinations_for"]


def destinations_for(trainer: Trainer) -> list[Destination]:
    """Where the Trainer's loggers can hold what the monitor logs: each logger gets all it can hold.

    TensorBoard, Weights & Biases and MLflow loggers get images, scalars and tables in their own run;
    scalars go through the logger's ``log_metrics``, so its prefix and step bookkeeping apply. The
    other loggers (``CSVLogger``, custom ones) get the scalars, each as a destination of its own (one
    that fails is named, and stops no other), and the images and tables, which they cannot hold, go as
    files to one folder under the first one's log directory, with one warning.
    """
    destinations: list[Destination] = []
    others: list[Logger] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # descriptions go with the first point of each scalar, under the tag log_metrics would write
            prefix = getattr(logger, "_prefix", "")
            metric_prefix = f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""
            destinations.append(
                TensorBoardDestination(logger.experiment, logger.log_metrics, DESCRIPTIONS, metric_prefix)
            )
        elif isinstance(logger, WandbLogger):
            destinations.append(WandbDestination(logger.experiment, logger.log_metrics))
        elif isinstance(logger, MLFlowLogger):
            destinations.append(MLflowDestination(logger.experiment, logger.run_id, logger.log_metrics))
        else:
            others.append(logger)
    if others:
        folder = Path(getattr(others[0], "log_dir", None) or others[0].save_dir or trainer.default_root_dir)
        for logger in others:
            where = getattr(logger, "log_dir", None) or logger.save_dir
            name = f"{type(logger).__name__}{f' ({where})' if where else ''}"
            destinations.append(MetricsDestination(logger.log_metrics, name))
        destinations.append(PngFolderDestination(folder, scalars=False))
        kinds = ", ".join(type(logger).__name__ for logger in others)
        rank_zero_warn(
            f"ReceptiveFieldMonitor: {kinds} cannot hold images, so they are written as"
            f" {folder / TAG}/<k>_<layer>/step_<step>.png and the tables as {folder / TAG}/<table>.md; the scalars"
            f" go to {kinds}. HINT: add a TensorBoardLogger, WandbLogger or MLFlowLogger to see the images there."
        )
    return destinations
