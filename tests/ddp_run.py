"""Run by test_callback.py: a 2-process CPU DDP fit (gloo) with the monitor on. Writes report.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from rf_callback import ReceptiveFieldMonitor
from tests.lightning_helpers import TinyCNN, loaders

if __name__ == "__main__":
    out = Path(sys.argv[1])
    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=TensorBoardLogger(out, name="ddp"),
        callbacks=[ReceptiveFieldMonitor(layers=["conv2"])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyCNN(), *loaders())
    if trainer.is_global_zero:
        steps = trainer.global_step // trainer.max_epochs
        report = {"world_size": trainer.world_size, "log_dir": trainer.logger.log_dir, "steps_per_epoch": steps}
        (out / "report.json").write_text(json.dumps(report))
