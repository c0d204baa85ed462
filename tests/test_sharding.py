"""Sharded parameters (FSDP2, FSDP, DeepSpeed ZeRO-3): the trace never touches the model, maps equal one process.

The unit tests shard over a one-process gloo group (FSDP2 and FSDP run on the CPU): what the setup
trace leaves of the model, the twin's structure, the gathered weights. The end-to-end tests run two
gloo processes (``tests/sharded_run.py``) through Lightning's ``ModelParallelStrategy`` and plain
loops, each with a short process-group timeout, and compare with a single process on the same
weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from rf_callback import ProbeMonitor, ReceptiveFieldMonitor, receptive_fields, receptive_maps
from rf_callback.callback import _sharded_root
from rf_callback.sharding import UnsupportedShardingError, gathered, sharding_of, structure_twin
from tests import sharded_run
from tests.lightning_helpers import TinyCNN, loaders, read_events
from tests.sharded_run import tiny_net as net

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")  # one process
LAYERS = ["0", "1", "4"]


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group: FSDP2 and FSDP shard over it on the CPU."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def fsdp2(per_layer: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    return sharded_run.fsdp2(net()) if per_layer else fully_shard(net())


def fsdp1() -> nn.Module:
    return sharded_run.fsdp1_flat(net())


def snapshot(model: nn.Module) -> list:
    """Everything of each module the trace must leave alone, by identity where identity matters."""
    from torch.distributed.fsdp import FSDPModule

    state = []
    for name, module in model.named_modules():
        fsdp_state = module._get_fsdp_state() if isinstance(module, FSDPModule) else None
        state.append(
            (
                name,
                type(module),
                module.training,
                sorted(module.__dict__),
                {key: dict(getattr(module, key)) for key in ("_forward_pre_hooks", "_forward_hooks")},
                [(key, id(p), type(p), p.device, tuple(p.shape)) for key, p in module._parameters.items()],
                [(key, id(b), b.device) for key, b in module._buffers.items()],
                None if fsdp_state is None else fsdp_state._is_root,  # lazily initialised by a first forward
            )
        )
    return state


# ---- detection -------------------------------------------------------------------------------------------
def test_whole_parameters_are_not_sharded(group):
    model = net()
    assert sharding_of(model) is None
    assert sharding_of(nn.parallel.DistributedDataParallel(model)) is None
    assert sharding_of(fsdp2()) == "fsdp2"
    assert sharding_of(fsdp2(per_layer=False)) == "fsdp2"
    assert sharding_of(fsdp1()) == "fsdp"


def test_hybrid_sharding_is_fsdp2_and_tensor_parallel_parameters_are_refused(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    hybrid = fully_shard(
        net(), mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    )  # HSDP: (Replicate(), Shard(0))
    assert sharding_of(hybrid) == "fsdp2"
    split = net()
    split[0].weight = nn.Parameter(
        distribute_tensor(split[0].weight.detach(), init_device_mesh("cpu", (1,)), [Shard(1)])
    )
    with pytest.raises(
        UnsupportedShardingError, match=r"'0\.weight' is a DTensor placed .*Shard\(dim=1\).*outside FSDP2"
    ):
        sharding_of(split)
    with pytest.raises(ValueError, match="tensor parallelism .* HINT: shard with FSDP2 alone"):
        ProbeMonitor(split, torch.rand(2, 1, 12, 12))


# ---- the setup trace ---------------------------------------------------------------------------------------
def ddp() -> nn.Module:
    return nn.parallel.DistributedDataParallel(net())


def compiled() -> nn.Module:
    return torch.compile(net(), backend="eager")


@pytest.mark.parametrize(
    "make",
    [fsdp2, lambda: fsdp2(per_layer=False), fsdp1, ddp, compiled],
    ids=["fsdp2", "fsdp2-root", "fsdp", "ddp", "compiled"],
)
def test_the_setup_trace_leaves_a_wrapped_or_sharded_model_untouched_and_trainable(group, make):
    model = make()
    before = snapshot(model)
    table = receptive_fields(model, (1, 12, 12))
    ProbeMonitor(model, torch.rand(2, 1, 12, 12), LAYERS)
    assert snapshot(model) == before  # no hook run or added, no lazy initialisation, no parameter or device moved
    reference = receptive_fields(net(), (1, 12, 12))
    assert list(table) == list(reference)
    assert all(table[k].to_record() == reference[k].to_record() for k in reference)
    # The model then trains as if nothing had happened (FSDP2's lazy initialisation comes with its first forward).
    plain, x = net(), torch.rand(4, 1, 12, 12)
    assert torch.equal(model(x), plain(x))


def test_the_twin_copies_structure_not_state():
    model = net()
    model[0].register_forward_pre_hook(lambda module, args: None)
    model.threshold = 0.5
    twin = structure_twin(model)
    assert type(twin[0]) is nn.Conv2d and twin[0] is not model[0]
    assert not twin[0]._forward_pre_hooks and model[0]._forward_pre_hooks
    assert twin.threshold == 0.5 and twin[1].running_mean.device.type == "meta"
    twin.eval()
    assert model.training and model[1].training


def test_tied_weights_stay_tied_in_the_twin():
    model = net()
    model.add_module("again", model[0])
    twin = structure_twin(model)
    assert twin.again is twin[0]


# ---- maps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [fsdp2, lambda: fsdp2(per_layer=False), fsdp1], ids=["fsdp2", "fsdp2-root", "fsdp"])
def test_maps_of_a_sharded_model_equal_those_of_one_process(group, make):
    model, plain = make(), net()
    probes = torch.rand(3, 1, 12, 12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 4, (8,))
    for trained, opt in ((model, optimizer), (plain, reference_optimizer)):
        nn.functional.cross_entropy(trained(x), y).backward()
        opt.step()  # the gradients stay: the maps must not touch them
    grads = [
        p.grad.clone() if not hasattr(p.grad, "to_local") else p.grad.to_local().clone() for p in model.parameters()
    ]
    monitor = ProbeMonitor(model, probes, LAYERS, unit="max")
    assert monitor.sharded
    result = monitor.compute()
    expected = receptive_maps(plain, probes, LAYERS, unit="max")
    assert torch.equal(result.maps, expected.maps) and torch.equal(result.units, expected.units)
    after = [p.grad if not hasattr(p.grad, "to_local") else p.grad.to_local() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads, after))
    assert model.training and all(module.training for module in model.modules())
    assert torch.equal(model(x), plain(x))  # the next step is unchanged


def test_gathered_weights_are_detached_and_released(group):
    from torch.distributed.tensor import DTensor

    model = fsdp2()
    with gathered(model) as whole:
        assert torch.is_grad_enabled()  # gathering's no_grad ends with the gathering
        assert not any(isinstance(p, DTensor) or p.requires_grad for p in whole.parameters())
        assert whole[0].weight.shape == (4, 1, 3, 3) and whole[1].running_mean is model[1].running_mean
    assert all(isinstance(p, DTensor) and p.requires_grad for p in model.parameters())


def test_receptive_maps_refuses_a_sharded_model_and_names_the_way(group):
    with pytest.raises(ValueError, match=r"sharded across ranks \(fsdp2\).*ProbeMonitor\(model, probes\)\.compute\(\)"):
        receptive_maps(fsdp2(), torch.rand(2, 1, 12, 12))


def test_log_without_destinations_computes_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a writer made by default would put its files
    monitor = ProbeMonitor(net(), torch.rand(2, 1, 12, 12), LAYERS)
    result = monitor.log(None, step=0)
    assert result.maps.shape == (2, 3, 12, 12) and not list(tmp_path.iterdir())


# ---- the callback's choices --------------------------------------------------------------------------------
def test_fsdps_root_wrapper_is_the_monitored_model(group):
    root = fsdp1()
    inner = root.module
    assert _sharded_root(SimpleNamespace(strategy=SimpleNamespace(model=root)), inner) is root
    plain = net()
    assert _sharded_root(SimpleNamespace(strategy=SimpleNamespace(model=plain)), plain) is plain


# ---- two processes ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def run_two_processes(tmp_path: Path, scenario: str) -> dict:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_run.py"), str(tmp_path), str(free_port()), scenario],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        # No CUDA: on a GPU machine the device mesh would make a gloo group of its own with the 30-minute default
        # timeout, and a rank left waiting would outlive this test; the default group's is 60 s (sharded_run.py).
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((tmp_path / "report.json").read_text())


def logged(log_dir: str, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in read_events(log_dir).Scalars(tag)}


@pytest.mark.timeout(300)
def test_lightning_model_parallel_strategy_per_layer_and_whole_model(tmp_path):
    """FSDP2 in ``configure_model``, two gloo processes: the run ends by itself, maps land once at the steps a
    single process logs them (0, then each epoch's validation step), equal to a single process on the same
    weights, and training is bit-identical with and without the callback."""
    report = run_two_processes(tmp_path, "lightning")
    for name in ("PerLayer", "WholeModel"):
        run = report[name]
        assert run["bit_identical"] and run["gradients_left_none"]
        steps_per_epoch = run["global_step"] // 2
        expected_steps = [0, steps_per_epoch - 1, 2 * steps_per_epoch - 1]
        events = read_events(run["log_dir"])
        assert [image.step for image in events.Images("receptive_field/02_conv2")] == expected_steps
        for tag, value in run["expected"]["initial"].items():
            assert logged(run["log_dir"], tag)[0] == pytest.approx(value, rel=1e-6), tag
        for tag, value in run["expected"]["final"].items():
            assert logged(run["log_dir"], tag)[expected_steps[-1]] == pytest.approx(value, rel=1e-6), tag
        assert [p.name for p in Path(run["log_dir"]).parent.iterdir()] == ["version_0"]  # rank zero alone wrote
        assert not [tag for tag in read_events(run["plain_log_dir"]).Tags()["images"]]


@pytest.mark.timeout(300)
def test_plain_loops_under_fsdp2_and_fsdp(tmp_path):
    report = run_two_processes(tmp_path, "loops")
    for name in ("fsdp2", "fsdp", "fsdp_flat"):
        run = report[name]
        assert run["bit_identical"]
        assert run["last"] == pytest.approx(run["expected_last"], rel=1e-6)
        assert [image.step for image in read_events(run["log_dir"]).Images("receptive_field/01_4")] == [0, 1, 2]


@pytest.mark.timeout(300)
def test_a_plain_loop_under_deepspeed_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    report = run_two_processes(tmp_path, "deepspeed")
    assert report["bit_identical"] and report["zero2_whole"]
    assert report["last"] == pytest.approx(report["expected_last"], rel=1e-6)
    assert [image.step for image in read_events(report["log_dir"]).Images("receptive_field/00_0")] == [0, 1, 2]


class TensorParallelHead(TinyCNN):
    """FSDP2 on the data-parallel mesh, and the head split by tensor parallelism: refused before the first step."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(self.head, self.device_mesh["tensor_parallel"], ColwiseParallel())
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran before the refusal")


def test_tensor_parallelism_is_refused_when_fitting_starts(group, tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[ReceptiveFieldMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    message = (
        r"ReceptiveFieldMonitor under ModelParallelStrategy: parameter 'head\.weight' is a DTensor .* tensor parall"
    )
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(TensorParallelHead(), *loaders())
    assert trainer.global_step == 0
