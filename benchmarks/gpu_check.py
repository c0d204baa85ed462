"""Everything in rf_callback that needs a GPU, checked on one GPU in at most 8 minutes: PASS / FAIL lines and figures.

    python benchmarks/gpu_check.py                         # one CUDA GPU (NCCL for the strategies)
    python benchmarks/gpu_check.py --only maps_cuda_vs_cpu,callback_bf16_mixed
    python benchmarks/gpu_check.py --device cpu             # a dry run of what can run on a CPU

Checks (each prints ``PASS <check>: ...``, ``FAIL <check>: ...`` or ``SKIP <check>: ...`` and ``FIGURE`` lines):

* ``maps_cuda_vs_cpu``: resnet18 (random weights) maps, units and ERF statistics on the GPU equal those on
  the CPU for the same weights (float32, TF32 off), ``unit="center"`` and ``"max"``;
* ``callback_16_mixed`` / ``callback_bf16_mixed``: the callback in a Lightning fit at that precision: the fit
  ends, maps land at steps 0, s-1, 2s-1, final weights bit-identical with and without the callback;
* ``channels_last``: a channels-last model and probes on the GPU give the maps of the contiguous model;
* ``resnet50_logging_pass``: a measurement: one logging pass (10 probes, 224 px, default layers), and its maps
  alone, against one plain forward+backward of the probes, medians of interleaved repeats (for the README's
  Performance table);
* ``fsdp_strategy``, ``model_parallel_fsdp2`` (and ``_offload``: ``CPUOffloadPolicy``), ``deepspeed_stage_3``: the
  callback under ``FSDPStrategy`` (FSDP1), ``ModelParallelStrategy`` (FSDP2) and ``deepspeed_stage_3`` with
  ``devices=1`` (NCCL): maps at the documented steps, equal to one process on the same (gathered) weights, training
  bit-identical with and without the callback. ``deepspeed_stage_3`` is skipped when DeepSpeed is not
  installed (``pip install -e ".[deepspeed]"``).

Each check runs in a child process with its own time budget, so that one that fails, crashes or hangs
(a collective that never returns) stops none of the others; all of them together stop at ``--budget``
seconds (470 by default). Exit status 0 when no check failed. Until this has run on a GPU, the GPU
paths are untested (README, "Its limits").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parents[1]

Report = list[str]
"""A check's lines: ``PASS ...``, ``FAIL ...``, ``SKIP ...`` or ``FIGURE ...``."""


# ---- what the checks share ---------------------------------------------------------------------------------
def _torch_device(device: str):
    import torch

    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def _net_class():
    """A small CNN as a LightningModule; ``shard="fsdp2"`` applies ``fully_shard`` per layer in ``configure_model``."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule
    from torch import nn

    class Net(LightningModule):
        def __init__(self, shard: str | None = None) -> None:
            super().__init__()
            self.shard = shard
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(
                8, 16, 3, stride=2, padding=1
            )  # no max pooling: its CUDA backward is not deterministic
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
            return self.head(x.mean((2, 3)))

        def configure_model(self):
            if self.shard in ("fsdp2", "fsdp2_offload"):
                from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

                policy = CPUOffloadPolicy() if self.shard == "fsdp2_offload" else OffloadPolicy()
                for module in (self.conv1, self.conv2, self.head):
                    fully_shard(module, offload_policy=policy)
                fully_shard(self, offload_policy=policy)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Net


def _loaders():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def dataset(seed: int, count: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(count) % 4
        images = torch.rand(count, 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1) / 4
        return TensorDataset(images, labels)

    return DataLoader(dataset(0, 64), batch_size=16, shuffle=True), DataLoader(dataset(1, 32), batch_size=16)


def _fit(device: str, out: Path, name: str, monitored: bool, strategy="auto", precision="32-true", shard=None):
    """A seeded two-epoch fit; returns (trainer, the final weights gathered on the CPU, the callback)."""
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from rf_callback import ReceptiveFieldMonitor

    class KeepWeights(Callback):
        """Gathers the trained weights before the strategy tears down (and moves or frees them)."""

        def on_train_end(self, trainer, pl_module) -> None:
            self.weights = _full_weights(trainer, pl_module)

    seed_everything(0)
    callback = ReceptiveFieldMonitor(layers=["conv1", "bn", "conv2"]) if monitored else None
    keep = KeepWeights()
    trainer = Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        strategy=strategy() if callable(strategy) else strategy,  # a strategy instance serves one Trainer
        precision=precision,
        max_epochs=2,
        logger=TensorBoardLogger(out, name=name),
        callbacks=[keep, callback] if callback else [keep],
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_net_class()(shard), *_loaders())
    return trainer, keep.weights, callback


def _full_weights(trainer, model) -> dict:
    """The trained weights on the CPU, gathered from whatever the strategy sharded."""
    from rf_callback.callback import _sharded_root
    from rf_callback.sharding import gathered

    with gathered(_sharded_root(trainer, model)) as whole:
        return {key: value.detach().float().cpu().clone() for key, value in whole.state_dict().items()}


def _scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("receptive_field/")]
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in tags}


def _callback_check(device: str, check: str, strategy="auto", precision="32-true", shard=None) -> Report:
    """Fit with and without the callback: the maps' steps, bit-identical weights, and the last statistics against
    one process on the same (gathered) weights."""
    import torch

    from rf_callback import ProbeMonitor

    report: Report = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        trainer, with_weights, callback = _fit(device, out, "with", True, strategy, precision, shard)
        steps_per_epoch = trainer.global_step // 2
        scalars = _scalars(trainer.logger.log_dir)
        _, without_weights, _ = _fit(device, out, "without", False, strategy, precision, shard)
        expected_steps = [0, steps_per_epoch - 1, 2 * steps_per_epoch - 1]
        steps = sorted(scalars["receptive_field/02_conv2/erf_size"])
        identical = all(torch.equal(with_weights[k], without_weights[k]) for k in without_weights)
        report.append(f"FIGURE {check}: maps logged at steps {steps}; erf_size of conv2 at the last one "
                      f"{scalars['receptive_field/02_conv2/erf_size'][steps[-1]]:.3f}")  # fmt: skip
        if not identical:
            _, again, _ = _fit(device, out, "again", False, strategy, precision, shard)
            repeatable = all(torch.equal(again[k], without_weights[k]) for k in without_weights)
            cause = "the callback changed training" if repeatable else "two runs without the callback differ too"
            report.append(f"FAIL {check}: final weights differ with and without the callback ({cause})")
        if steps != expected_steps:
            report.append(f"FAIL {check}: maps at steps {steps}, expected {expected_steps}")
        reference = _net_class()()
        reference.load_state_dict(with_weights)
        monitor = ProbeMonitor(reference.to(_torch_device(device)), callback.probes.images, ["conv1", "bn", "conv2"])
        expected = monitor.scalars(monitor.compute())
        worst = max(abs(scalars[tag][steps[-1]] - value) / max(abs(value), 1e-12) for tag, value in expected.items())
        report.append(f"FIGURE {check}: largest relative difference from one process on the same weights {worst:.2e}")
        if worst > 1e-5:
            report.append(f"FAIL {check}: statistics differ from one process on the same weights ({worst:.2e})")
        if not any(line.startswith("FAIL") for line in report):
            report.append(f"PASS {check}: fit ended, maps at {steps}, training bit-identical with and without")
    return report


# ---- the checks ------------------------------------------------------------------------------------------------
def maps_cuda_vs_cpu(device: str) -> Report:
    import copy

    import torch
    import torchvision

    from rf_callback import ProbeMonitor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    size = 112 if device == "cuda" else 64  # the dry run on a CPU compares the CPU with itself: it only runs the code
    probes = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = copy.deepcopy(model).to(_torch_device(device))
    report: Report = []
    for unit in ("center", "max"):
        on_cpu = ProbeMonitor(model, probes, unit=unit).compute()
        on_device = ProbeMonitor(target, probes, unit=unit).compute()
        peak = on_cpu.maps.flatten(2).amax(2).clamp(min=1e-30)
        difference = ((on_device.maps - on_cpu.maps).abs().flatten(2).amax(2) / peak).max().item()
        statistics_cpu, statistics_device = on_cpu.erf.mean(), on_device.erf.mean()
        erf = max((statistics_device[k] - statistics_cpu[k]).abs().max().item() for k in ("size", "mass_side"))
        report.append(f"FIGURE maps_cuda_vs_cpu[{unit}]: largest map difference {difference:.2e} of the peak, "
                      f"ERF size/mass side {erf:.3f} px, layers {list(on_cpu.layers)}")  # fmt: skip
        if not torch.equal(on_cpu.units, on_device.units) or not torch.equal(on_cpu.boxes, on_device.boxes):
            report.append(f"FAIL maps_cuda_vs_cpu[{unit}]: units or boxes differ between the devices")
        elif difference > 1e-4:
            report.append(f"FAIL maps_cuda_vs_cpu[{unit}]: maps differ by {difference:.2e} of their peak (> 1e-4)")
        else:
            report.append(f"PASS maps_cuda_vs_cpu[{unit}]: maps equal within {difference:.1e} of their peak")
    return report


def callback_16_mixed(device: str) -> Report:
    if device != "cuda":
        return ["SKIP callback_16_mixed: 16-mixed needs a GPU"]
    return _callback_check(device, "callback_16_mixed", precision="16-mixed")


def callback_bf16_mixed(device: str) -> Report:
    return _callback_check(device, "callback_bf16_mixed", precision="bf16-mixed")


def channels_last(device: str) -> Report:
    import torch
    import torchvision

    from rf_callback import ProbeMonitor

    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(_torch_device(device))
    probes = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    plain = ProbeMonitor(model, probes).compute()
    model = model.to(memory_format=torch.channels_last)
    last = ProbeMonitor(model, probes.to(memory_format=torch.channels_last)).compute()
    peak = plain.maps.flatten(2).amax(2).clamp(min=1e-30)
    difference = ((last.maps - plain.maps).abs().flatten(2).amax(2) / peak).max().item()
    figure = f"FIGURE channels_last: largest map difference {difference:.2e} of the peak"
    if torch.equal(plain.units, last.units) and difference <= 1e-4:
        return [figure, f"PASS channels_last: the channels-last model gives the same maps ({difference:.1e})"]
    return [figure, f"FAIL channels_last: maps or units differ ({difference:.2e} of the peak)"]


def resnet50_logging_pass(device: str) -> Report:
    import torch
    import torchvision
    from torch.utils.tensorboard import SummaryWriter

    from rf_callback import ProbeMonitor

    name, size, repeats = ("resnet50", 224, 5) if device == "cuda" else ("resnet18", 64, 2)
    target = _torch_device(device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).to(target)
    probes = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(0)).to(target)
    monitor = ProbeMonitor(model, probes)

    def synchronized(work: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward_backward() -> None:
        model(probes).sum().backward()
        model.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        passes = {"fwd+bwd": forward_backward, "compute": monitor.compute, "pass": lambda: monitor.log(writer, 0)}
        for work in passes.values():  # warm-up: cuDNN's algorithm choice, the allocator
            synchronized(work)
        times: dict[str, list[float]] = {key: [] for key in passes}
        for _ in range(repeats):
            for key, work in passes.items():
                times[key].append(synchronized(work))
        writer.close()
    medians = {key: statistics.median(values) for key, values in times.items()}
    ratio, maps = medians["pass"] / medians["fwd+bwd"], medians["compute"] / medians["fwd+bwd"]
    figure = (f"FIGURE resnet50_logging_pass: {name} at {size} px, 10 probes, {len(monitor.layers)} layers on "
              f"{device}: fwd+bwd {medians['fwd+bwd'] * 1e3:.1f} ms, maps {medians['compute'] * 1e3:.1f} ms "
              f"({maps:.2f}x), whole pass with drawing and writing {medians['pass'] * 1e3:.1f} ms ({ratio:.2f}x), "
              f"medians of {repeats}")  # fmt: skip
    # A measurement: drawing and PNG encoding run on the CPU whatever the device, so the CPU's <= 3x target for the
    # whole pass says little on a GPU; the maps' share is the GPU's part.
    return [
        figure,
        f"PASS resnet50_logging_pass: measured: maps {maps:.2f}x, whole pass {ratio:.2f}x a forward+backward",
    ]


def fsdp_strategy(device: str) -> Report:
    if device != "cuda":
        return ["SKIP fsdp_strategy: Lightning's FSDPStrategy needs a GPU"]
    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn

    def strategy() -> FSDPStrategy:
        return FSDPStrategy(auto_wrap_policy={nn.Conv2d, nn.Linear})

    return _callback_check(device, "fsdp_strategy", strategy=strategy)


def _model_parallel(device: str, check: str, shard: str) -> Report:
    from lightning.pytorch.strategies import ModelParallelStrategy

    def strategy() -> ModelParallelStrategy:
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)

    return _callback_check(device, check, strategy, shard=shard)


def model_parallel_fsdp2(device: str) -> Report:
    return _model_parallel(device, "model_parallel_fsdp2", "fsdp2")


def model_parallel_fsdp2_offload(device: str) -> Report:
    """FSDP2 with ``CPUOffloadPolicy``: the shards live on the CPU, the gathering on the GPU."""
    if device != "cuda":
        return ["SKIP model_parallel_fsdp2_offload: CPU offload moves shards between a GPU and the CPU"]
    return _model_parallel(device, "model_parallel_fsdp2_offload", "fsdp2_offload")


def deepspeed_stage_3(device: str) -> Report:
    if device != "cuda":
        return ["SKIP deepspeed_stage_3: Lightning's DeepSpeedStrategy needs a GPU"]
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        return [f"SKIP deepspeed_stage_3: DeepSpeed is not installed ({error}); pip install -e '.[deepspeed]'"]
    return _callback_check(device, "deepspeed_stage_3", strategy="deepspeed_stage_3")


def selftest_fail(device: str) -> Report:
    """The machinery's own test: a check that raises."""
    raise RuntimeError("a check that fails on purpose")


def selftest_hang(device: str) -> Report:
    """The machinery's own test: a check that never returns (a collective waiting for a rank that is not there)."""
    time.sleep(3600)
    return []


CHECKS: dict[str, tuple[Callable[[str], Report], int]] = {
    "maps_cuda_vs_cpu": (maps_cuda_vs_cpu, 60),
    "callback_bf16_mixed": (callback_bf16_mixed, 60),
    "callback_16_mixed": (callback_16_mixed, 60),
    "channels_last": (channels_last, 45),
    "resnet50_logging_pass": (resnet50_logging_pass, 75),
    "fsdp_strategy": (fsdp_strategy, 70),
    "model_parallel_fsdp2": (model_parallel_fsdp2, 70),
    "model_parallel_fsdp2_offload": (model_parallel_fsdp2_offload, 60),
    "deepspeed_stage_3": (deepspeed_stage_3, 90),
}
"""Check -> (function, seconds it may take, imports and a child process included), in the order they run."""
SELFTESTS = {"selftest_fail": (selftest_fail, 60), "selftest_hang": (selftest_hang, 5)}


# ---- running them ------------------------------------------------------------------------------------------------
def run_child(name: str, device: str) -> int:
    """In the child process: run one check, print its lines; exit 1 on any FAIL or exception."""
    function, _ = {**CHECKS, **SELFTESTS}[name]
    try:
        lines = function(device)
    except Exception as error:  # noqa: BLE001 - any failure of a check is its FAIL line, the others go on
        tail = traceback.format_exception(error)[-1].strip()
        lines = [f"FAIL {name}: {tail}", *(f"  {line}" for line in traceback.format_exc().splitlines()[-12:])]
    for line in lines:
        print(line, flush=True)
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


def run_all(names: list[str], device: str, budget: float, scale: float = 1.0) -> int:
    """In the parent: each check in a child process with a timeout (its own, times ``scale``); a summary; 1 if any
    check failed."""
    deadline = time.monotonic() + budget
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environment.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the bit-identity checks
    outcome: dict[str, str] = {}
    for name in names:
        _, seconds = {**CHECKS, **SELFTESTS}[name]
        left = deadline - time.monotonic()
        if left < 5:
            print(f"SKIP {name}: no time left in the {budget:.0f} s budget", flush=True)
            outcome[name] = "SKIP"
            continue
        limit = min(seconds * scale, left)
        start = time.monotonic()
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device]
        try:
            completed = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=limit, env=environment
            )
            output, errors, code = completed.stdout, completed.stderr, completed.returncode
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            output += f"FAIL {name}: no result within {limit:.0f} s: stopped (a hang, or too slow)\n"
            errors, code = "", 1
        lines = [line for line in output.splitlines() if line.startswith(("PASS", "FAIL", "SKIP", "FIGURE", "  "))]
        if code != 0 and not any(line.startswith("FAIL") for line in lines):
            lines.append(f"FAIL {name}: the child process exited with status {code}")
            lines += [f"  {line}" for line in errors.splitlines()[-8:]]
        for line in lines:
            print(line, flush=True)
        passed = any(line.startswith("PASS") for line in lines)
        outcome[name] = "FAIL" if code != 0 else "PASS" if passed else "SKIP"
        print(f"       {name}: {time.monotonic() - start:.1f} s", flush=True)
    print("\nSUMMARY " + ", ".join(f"{name} {state}" for name, state in outcome.items()), flush=True)
    return 1 if "FAIL" in outcome.values() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", default="", help="comma-separated checks (default: all): " + ", ".join(CHECKS))
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all checks together")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies each check's own time budget")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return run_child(args.child, args.device)
    names = [name for name in args.only.split(",") if name] or list(CHECKS)
    unknown = [name for name in names if name not in CHECKS and name not in SELFTESTS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("FAIL setup: no CUDA device (torch.cuda.is_available() is False); --device cpu for a dry run")
            return 1
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    return run_all(names, args.device, args.budget, args.budget_scale)


if __name__ == "__main__":
    sys.exit(main())
