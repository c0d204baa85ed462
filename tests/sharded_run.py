"""Run by test_sharding.py: two CPU processes (gloo) fitting sharded models, with and without the monitor.

``python tests/sharded_run.py OUT PORT SCENARIO`` writes ``OUT/report.json`` (rank zero) with what the
test checks against a single process. Each process sets up its own process group with a short
timeout (so that a rank left waiting fails in seconds, not in 30 minutes), the way ``torchrun``
would, and Lightning takes it as it is.

Scenarios:
    lightning: ``ModelParallelStrategy`` (FSDP2 in ``configure_model``), per-layer and whole-model
        ``fully_shard``, each fitted with and without the monitor.
    loops: plain loops with ``ProbeMonitor``: FSDP2 ``fully_shard`` and FSDP (``FullyShardedDataParallel``, with
        and without ``use_orig_params``), each trained with and without the monitor.
    deepspeed: a plain loop under DeepSpeed ZeRO-3, with and without the monitor; ZeRO-2 maps on rank zero alone.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1]))

from torch import nn

from tests.lightning_helpers import TinyCNN, loaders

WORLD = 2
TIMEOUT = timedelta(seconds=60)
LAYERS = ["conv1", "bn", "conv2"]


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank: the full values of the parameters and buffers (DTensors gathered), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


# ---- Lightning: ModelParallelStrategy ------------------------------------------------------------------
class PerLayer(TinyCNN):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for module in (self.conv1, self.conv2, self.head):
            fully_shard(module, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


class WholeModel(TinyCNN):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self, mesh=self.device_mesh["data_parallel"])


def fit(out: Path, model_class: type, monitored: bool, name: str) -> tuple[dict, object]:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rf_callback import ReceptiveFieldMonitor

    seed_everything(0)
    callback = ReceptiveFieldMonitor(layers=LAYERS) if monitored else None
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_epochs=2,
        logger=TensorBoardLogger(out, name=name),
        callbacks=[callback] if callback else [],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0 if model_class is WholeModel else 1,  # the baseline then gathers before any forward
    )
    model = model_class()
    trainer.fit(model, *loaders())
    report = {"log_dir": trainer.logger.log_dir, "global_step": trainer.global_step}
    return report, (model, callback)


def lightning(rank: int, out: Path) -> dict:
    from rf_callback import ProbeMonitor

    report: dict = {}
    for model_class in (PerLayer, WholeModel):
        name = model_class.__name__
        with_monitor, (model, callback) = fit(out, model_class, True, f"{name}_monitored")
        monitored_state = full_state(model)
        without, (plain, _) = fit(out, model_class, False, f"{name}_plain")
        plain_state = full_state(plain)
        if rank != 0:
            continue
        # The single-process reference: the same weights (initial and final) in an unsharded TinyCNN.
        torch.manual_seed(0)
        from lightning.pytorch import seed_everything

        seed_everything(0)
        initial = TinyCNN()
        final = TinyCNN()
        final.load_state_dict(monitored_state)
        probes = callback.probes.images
        expected = {}
        for label, reference in (("initial", initial), ("final", final)):
            monitor = ProbeMonitor(reference, probes, LAYERS)
            expected[label] = monitor.scalars(monitor.compute())
        report[name] = {
            **with_monitor,
            "plain_log_dir": without["log_dir"],
            "bit_identical": all(torch.equal(monitored_state[k], plain_state[k]) for k in plain_state),
            "expected": expected,
            "gradients_left_none": all(p.grad is None for p in model.parameters()),
        }
    return report


# ---- plain loops -------------------------------------------------------------------------------------------
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def train(rank: int, wrap, monitored: bool, out: Path, name: str) -> tuple[dict, dict | None]:
    """Three epochs of a plain loop; with ``monitored``, ``ProbeMonitor.log`` on every rank after each."""
    from torch.utils.tensorboard import SummaryWriter

    from rf_callback import ProbeMonitor

    model = wrap(tiny_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    probes = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    writer = SummaryWriter(str(out / name)) if monitored and rank == 0 else None
    monitor = ProbeMonitor(model, probes, layers=["0", "4"]) if monitored else None
    scalars = {}
    for epoch in range(3):
        for _ in range(2):
            x, y = torch.rand(8, 1, 12, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if monitor is not None:
            result = monitor.log(writer, step=epoch)
            assert (result is None) == (rank != 0), "maps on rank zero only"
            if result is not None:
                scalars[epoch] = monitor.scalars(result)
    if writer is not None:
        writer.close()
    state = full_state(model) if not hasattr(model, "_fsdp_wrapped_module") else _fsdp1_state(model)
    return state, scalars


def _fsdp1_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        return {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in model.state_dict().items()}


def reference_scalars(state: dict) -> dict:
    from rf_callback import ProbeMonitor

    net = tiny_net()
    net.load_state_dict(state)
    monitor = ProbeMonitor(net, torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(7)), ["0", "4"])
    return monitor.scalars(monitor.compute())


def fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for index in (0, 4, 8):
        fully_shard(model[index])
    return fully_shard(model)


def fsdp1(model: nn.Module, use_orig_params: bool = True) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    def policy(module, recurse, nonwrapped_numel):
        return recurse or isinstance(module, nn.Conv2d)

    device = torch.device("cpu")
    return FullyShardedDataParallel(model, device_id=device, auto_wrap_policy=policy, use_orig_params=use_orig_params)


def fsdp1_flat(model: nn.Module) -> nn.Module:
    """FSDP with ``use_orig_params=False``: the modules no longer hold their parameters at all."""
    return fsdp1(model, use_orig_params=False)


def loops(rank: int, out: Path) -> dict:
    report = {}
    for name, wrap in (("fsdp2", fsdp2), ("fsdp", fsdp1), ("fsdp_flat", fsdp1_flat)):
        monitored, scalars = train(rank, wrap, True, out, name)
        plain, _ = train(rank, wrap, False, out, f"{name}_plain")
        if rank == 0:
            report[name] = {
                "log_dir": str(out / name),
                "bit_identical": all(torch.equal(monitored[k], plain[k]) for k in plain),
                "last": scalars[2],
                "expected_last": reference_scalars(monitored),
            }
    return report


def zero(model: nn.Module, stage: int = 3) -> nn.Module:
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    return engine


def deepspeed_loop(rank: int, out: Path) -> dict:
    """ZeRO-3 in a plain loop: every parameter partitioned, even the smallest (persistence threshold 0)."""
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    from rf_callback import ProbeMonitor

    report = {}
    states = {}
    for monitored in (True, False):
        engine = zero(tiny_net())
        model = engine.module
        generator = torch.Generator().manual_seed(rank)
        probes = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(7))
        writer = SummaryWriter(str(out / "deepspeed")) if monitored and rank == 0 else None
        monitor = ProbeMonitor(model, probes, layers=["0", "4"]) if monitored else None
        for epoch in range(3):
            for _ in range(2):
                x, y = torch.rand(8, 1, 12, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)
                engine.backward(nn.functional.cross_entropy(engine(x), y))
                engine.step()
            if monitor is not None:
                result = monitor.log(writer, step=epoch)
                if result is not None:
                    report["last"] = monitor.scalars(result)
        if writer is not None:
            writer.close()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            states[monitored] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report["zero2_whole"] = zero2_on_rank_zero(rank)
    if rank == 0:
        report.update(
            log_dir=str(out / "deepspeed"),
            bit_identical=all(torch.equal(states[True][k], states[False][k]) for k in states[False]),
            expected_last=reference_scalars(states[True]),
        )
    return report


def zero2_on_rank_zero(rank: int) -> bool:
    """ZeRO-2 shards gradients and optimizer states, not parameters: rank zero maps alone, as under DDP."""
    from rf_callback import ProbeMonitor, receptive_maps
    from rf_callback.sharding import sharding_of

    engine = zero(tiny_net(), stage=2)
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 4, (8,))
    engine.backward(nn.functional.cross_entropy(engine(x), y))
    engine.step()
    whole = sharding_of(engine.module) is None
    if rank == 0:  # no collective: the other rank is already at the barrier
        probes = torch.rand(3, 1, 12, 12)
        reference = tiny_net()
        reference.load_state_dict(engine.module.state_dict())
        maps = ProbeMonitor(engine.module, probes, ["0", "4"]).compute().maps
        whole = whole and torch.equal(maps, receptive_maps(reference, probes, ["0", "4"]).maps)
    dist.barrier()
    return whole


def main(rank: int, out: Path, port: int, scenario: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    if scenario == "deepspeed":
        import deepspeed.comm.torch

        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce when it starts; gloo needs none of it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    report = {"lightning": lightning, "loops": loops, "deepspeed": deepspeed_loop}[scenario](rank, out)
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]), nprocs=WORLD)
