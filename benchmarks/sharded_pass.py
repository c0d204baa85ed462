"""What a logging pass costs when the parameters are sharded (FSDP2), against the same pass in one process.

Two CPU processes (gloo) shard resnet18 (torchvision, ``weights=None``) with ``fully_shard`` per residual
block and on the root; 10 probes at ``--size`` px, the default layers. Side by side, medians of
``--repeats`` interleaved repeats, one thread per process:

* ``one process``: :meth:`ProbeMonitor.compute` on an unsharded copy with the same weights (rank zero);
* ``sharded, rank 0``: :meth:`ProbeMonitor.compute` on the sharded model (gathering every parameter, then
  the maps on rank zero);
* ``sharded, rank 1``: the same call on the other rank (it gathers, keeps nothing, and returns);
* ``gather``: :func:`rf_callback.sharding.gathered` alone.

It also prints the bytes rank zero holds for the pass (the full parameters) and checks that the maps
equal those of one process.

    python benchmarks/sharded_pass.py [--repeats 5] [--size 112]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from rf_callback import ProbeMonitor
from rf_callback.sharding import gathered


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def timed(work) -> float:
    dist.barrier()
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def run(rank: int, port: int, repeats: int, size: int) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=600))
    model, plain = build(), build()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            fully_shard(block)
    fully_shard(model)
    probes = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(0))
    sharded, single = ProbeMonitor(model, probes), ProbeMonitor(plain, probes)
    if rank == 0:
        assert torch.equal(sharded.compute().maps, single.compute().maps), "maps differ from one process"
    else:
        sharded.compute()

    def gather_only() -> None:
        with gathered(model):
            pass

    times: dict[str, list[float]] = {"one process": [], "sharded": [], "gather": []}
    for _ in range(repeats):
        times["one process"].append(timed(single.compute) if rank == 0 else timed(lambda: None))
        times["sharded"].append(timed(sharded.compute))
        times["gather"].append(timed(gather_only))
    medians = {key: statistics.median(values) for key, values in times.items()}
    everything = [None, None]
    dist.all_gather_object(everything, medians)
    if rank == 0:
        held = sum(p.numel() * p.element_size() for p in plain.parameters())
        one = everything[0]["one process"]
        print(f"resnet18 at {size} px, 10 probes, {len(single.layers)} layers, 2 gloo processes, 1 thread each, "
              f"medians of {repeats}\n")  # fmt: skip
        print(f"one process                 {one:7.3f} s")
        print(
            f"sharded, rank 0 (gather+maps) {everything[0]['sharded']:7.3f} s = {everything[0]['sharded'] / one:.2f}x"
        )
        print(
            f"sharded, rank 1 (gather only) {everything[1]['sharded']:7.3f} s = {everything[1]['sharded'] / one:.2f}x"
        )
        print(f"gather alone, rank 0          {everything[0]['gather']:7.3f} s = {everything[0]['gather'] / one:.2f}x")
        print(f"rank 0 holds the full parameters for the pass: {held / 2**20:.1f} MiB; maps equal one process")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    mp.spawn(run, args=(port, args.repeats, args.size), nprocs=2)


if __name__ == "__main__":
    main()
