"""How much does ReceptiveFieldMonitor add to a training run? Same seed, with and without, in one run.

Trains the default config (SmallCNN on Fashion-MNIST) twice, alternating order, and prints the
wall times, the overhead (target: at most 3%), the time the callback itself spent, the bytes its
images add to the event file per epoch (target: at most 1 MB), and whether the final weights are
identical.

    python benchmarks/callback_overhead.py [--epochs 5] [--repeats 1] [--data-dir data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import ReceptiveFieldMonitor
from rf_callback.demos.cnns import SmallCNN
from rf_callback.demos.fashion_mnist import FashionMNISTDataModule


class TimedMonitor(ReceptiveFieldMonitor):
    """The monitor, with the seconds spent in its hooks added up."""

    spent = 0.0

    def _timed(self, hook, *args):
        start = time.perf_counter()
        hook(*args)
        TimedMonitor.spent += time.perf_counter() - start

    def on_fit_start(self, trainer, pl_module):
        self._timed(super().on_fit_start, trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self._timed(super().on_train_start, trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._timed(super().on_validation_epoch_end, trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._timed(super().on_train_epoch_end, trainer, pl_module)


def run(monitored: bool, epochs: int, data_dir: str, out: Path) -> tuple[float, dict, Path]:
    seed_everything(0)
    data = FashionMNISTDataModule(data_dir=data_dir, source_dirs=["../shared/data/FashionMNIST/raw"])
    model = SmallCNN()
    logger = TensorBoardLogger(out, name="with" if monitored else "without")
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[TimedMonitor()] if monitored else [],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start, model.state_dict(), Path(logger.log_dir)


def image_bytes(log_dir: Path) -> tuple[int, int]:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    tags = [t for t in events.Tags()["images"] if t != "receptive_field/summary"]  # maps only, not the chart
    images = [image for tag in tags for image in events.Images(tag)]
    return sum(len(image.encoded_image_string) for image in images), len({image.step for image in images})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    FashionMNISTDataModule(data_dir=args.data_dir, source_dirs=["../shared/data/FashionMNIST/raw"]).prepare_data()

    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for monitored in (False, True) if repeat % 2 == 0 else (True, False):
                seconds, weights, log_dir = run(monitored, args.epochs, args.data_dir, Path(folder))
                times[monitored].append(seconds)
                if monitored:
                    monitored_weights, monitored_dir = weights, log_dir
                else:
                    plain_weights = weights
        total, logged_steps = image_bytes(monitored_dir)

    plain, monitored = min(times[False]), min(times[True])
    same = all(torch.equal(plain_weights[k], monitored_weights[k]) for k in plain_weights)
    print(
        f"SmallCNN on Fashion-MNIST, {args.epochs} epochs, {torch.get_num_threads()} threads, best of {args.repeats}:"
    )
    print(f"  without the callback: {plain:7.1f} s")
    print(f"  with the callback:    {monitored:7.1f} s   overhead {100 * (monitored / plain - 1):+.1f}% (target <= 3%)")
    spent = TimedMonitor.spent / args.repeats
    print(f"  time inside the callback's hooks: {spent:.2f} s per run ({100 * spent / plain:.1f}% of the run)")
    print(f"  images: {total / logged_steps / 1e6:.2f} MB per logged epoch (target <= 0.2 MB), {logged_steps} steps")
    print(f"  final weights identical with and without: {same}")


if __name__ == "__main__":
    main()
