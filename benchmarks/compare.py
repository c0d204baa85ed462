"""How long does ``compare`` take, next to merely loading the checkpoints it compares?

Makes 5 checkpoints of the default SmallCNN with a ReceptiveFieldMonitor, as ``train.py`` does (a couple of
training steps per epoch: the weights do not change the cost), on Fashion-MNIST when the files are at hand,
else on random images of the same shape. Then times, interleaved in one process:

* load: ``SmallCNN.load_from_checkpoint(path, map_location="cpu")`` for each checkpoint (the model objects);
* compare_checkpoints: loading, tracing and the receptive maps, no files;
* compare, default outputs: ``compare_checkpoints`` + ``write_comparison`` as ``rf-callback compare`` runs them
  (comparison.png, erf.csv, erf.md, erf_size.png);
* compare + TensorBoard run: the same with ``--tensorboard``.

Target: compare < 10x load.

    python benchmarks/compare.py [--checkpoints 5] [--repeats 10]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from timing import interleaved
from torch.utils.data import DataLoader, TensorDataset

from rf_callback import ReceptiveFieldMonitor
from rf_callback.compare import compare_checkpoints
from rf_callback.demos.cnns import SmallCNN
from rf_callback.export import write_comparison


def data() -> tuple[object, str]:
    """The Fashion-MNIST data module when the files are at hand, else random images of its shape."""
    from rf_callback.demos.fashion_mnist import FashionMNISTDataModule

    datamodule = FashionMNISTDataModule(
        data_dir="data", source_dirs=["../shared/data/FashionMNIST/raw"], download=False
    )
    try:
        datamodule.prepare_data()
        return datamodule, "Fashion-MNIST"
    except FileNotFoundError as error:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(256, 1, 28, 28, generator=generator)
        loader = DataLoader(TensorDataset(images, torch.arange(256) % 10), batch_size=64)
        return (loader, loader), f"random images ({type(error).__name__})"


def make_checkpoints(folder: Path, count: int) -> tuple[list[Path], str]:
    seed_everything(0)
    source, kind = data()
    trainer = Trainer(
        default_root_dir=folder,
        max_epochs=count,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=TensorBoardLogger(folder, name="run"),
        callbacks=[ReceptiveFieldMonitor(), ModelCheckpoint(folder / "checkpoints", save_top_k=-1, every_n_epochs=1)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = SmallCNN(lr_schedule="constant")
    if isinstance(source, tuple):
        trainer.fit(model, *source)
    else:
        trainer.fit(model, datamodule=source)
    return sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime), kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, kind = make_checkpoints(folder, args.checkpoints)

        def load():
            return [SmallCNN.load_from_checkpoint(path, map_location="cpu") for path in paths]

        def compare(tensorboard: bool):
            comparison = compare_checkpoints(paths)
            write_comparison(comparison, folder / "out", folder / "tb" if tensorboard else None)

        times = interleaved(
            {
                "load: load_from_checkpoint x N": load,
                "compare_checkpoints (no files)": lambda: compare_checkpoints(paths),
                "compare, default outputs": lambda: compare(False),
                "compare + TensorBoard run": lambda: compare(True),
            },
            args.repeats,
        )
        comparison = compare_checkpoints(paths)
        written = write_comparison(comparison, folder / "out", folder / "tb")
        sizes = {path.name.split(".out.")[0]: path.stat().st_size for path in written}

    load_time = times["load: load_from_checkpoint x N"]
    print(
        f"SmallCNN, {len(paths)} checkpoints ({kind}), {len(comparison.probes)} probes x {len(comparison.layers)}"
        f" layers, {torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    for name, seconds in times.items():
        print(f"  {name:32s} {seconds * 1e3:8.1f} ms  {seconds / load_time:5.1f}x load")
    print("  files: " + ", ".join(f"{name} {size / 1e3:.0f} kB" for name, size in sizes.items()))
    for name in ("compare, default outputs", "compare + TensorBoard run"):
        print(f"{name} / load: {times[name] / load_time:.1f}x (target < 10x)")


if __name__ == "__main__":
    main()
