"""``benchmarks/gpu_check.py``: what can be checked without a GPU (its dry run on the CPU), and, on a machine with
CUDA, the GPU checks themselves (skipped here: no test depends on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_check(*arguments: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], check=False, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_each_check_is_isolated_a_failure_and_a_hang_stop_no_other():
    completed = gpu_check(
        "--device", "cpu", "--only", "selftest_fail,selftest_hang,maps_cuda_vs_cpu,fsdp_strategy",
        "--budget-scale", "4", timeout=280,
    )  # fmt: skip
    out = completed.stdout
    assert completed.returncode == 1, out + completed.stderr[-2000:]
    assert "FAIL selftest_fail: RuntimeError: a check that fails on purpose" in out
    assert "FAIL selftest_hang: no result within 20 s: stopped" in out
    assert "PASS maps_cuda_vs_cpu[center]" in out and "PASS maps_cuda_vs_cpu[max]" in out
    assert "SKIP fsdp_strategy: Lightning's FSDPStrategy needs a GPU" in out
    assert "SUMMARY selftest_fail FAIL, selftest_hang FAIL, maps_cuda_vs_cpu PASS, fsdp_strategy SKIP" in out


@pytest.mark.timeout(300)
def test_the_callback_check_passes_on_the_cpu_under_fsdp2():
    """The whole path of the strategy checks (two fits, gathered weights, a single-process reference) on the CPU."""
    completed = gpu_check("--device", "cpu", "--only", "model_parallel_fsdp2", "--budget-scale", "4", timeout=280)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-2000:]
    assert "PASS model_parallel_fsdp2: fit ended, maps at [0, 3, 7]" in completed.stdout


@cuda
@pytest.mark.timeout(600)
def test_the_gpu_checks_pass():
    completed = gpu_check(timeout=590)
    assert completed.returncode == 0, completed.stdout
