"""The README's two commands are the ones that work: CI runs the test command, the config exists."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lightning_helpers import read_events

ROOT = Path(__file__).parents[1]


def commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    main_job, tests = commands()
    assert main_job.endswith("python train.py") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_screenshot_is_in_the_repository():
    assert (ROOT / "docs" / "tensorboard.png").stat().st_size > 10_000


def runnable_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)```", text, re.DOTALL)


def test_the_readme_marks_its_runnable_snippets():
    assert len(runnable_blocks()) == 4


def test_the_trainer_snippet_runs_as_pasted(tmp_path, monkeypatch):
    """The first snippet, shortened to a few batches and pointed at a temporary folder."""
    code = runnable_blocks()[0]
    shortened = code.replace("max_epochs=3,", "max_epochs=1, limit_train_batches=3, limit_val_batches=2,")
    shortened = shortened.replace('"lightning_logs"', repr(str(tmp_path / "logs")))
    shortened = shortened.replace(
        "FashionMNISTDataModule(", f"FashionMNISTDataModule(data_dir={str(tmp_path / 'data')!r}, "
    )
    assert shortened.count("tmp") >= 2 and "limit_train_batches" in shortened
    monkeypatch.chdir(ROOT)  # the snippet names ../shared relative to the repository, as the README says
    exec(compile(shortened, "README.md", "exec"), {})
    assert list((tmp_path / "logs" / "my_run" / "version_0").glob("events.out.tfevents.*"))


def test_the_plain_loop_snippet_runs_as_pasted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(runnable_blocks()[1], "README.md", "exec"), {})
    events = read_events(tmp_path / "runs" / "plain_loop")
    tags = events.Tags()["images"]
    assert "receptive_field/summary" in tags
    maps = [tag for tag in tags if tag != "receptive_field/summary"]
    assert maps and all([i.step for i in events.Images(tag)] == [0, 1, 2] for tag in maps)


def test_the_fabric_snippet_runs_as_pasted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(runnable_blocks()[2], "README.md", "exec"), {})
    events = read_events(tmp_path / "runs" / "fabric")
    maps = [tag for tag in events.Tags()["images"] if tag != "receptive_field/summary"]
    assert maps and all([i.step for i in events.Images(tag)] == [0, 1] for tag in maps)


@pytest.mark.timeout(300)
def test_the_fsdp_snippet_runs_as_a_script_on_two_processes(tmp_path):
    """Saved as the README says, run with ``python fsdp_example.py`` (on a free port): two gloo processes."""
    code = runnable_blocks()[3]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    assert 'MASTER_PORT="29500"' in code
    (tmp_path / "fsdp_example.py").write_text(code.replace('"29500"', f'"{port}"'))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "fsdp_example.py"],
        check=False,
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    events = read_events(tmp_path / "runs" / "fsdp")
    tags = events.Tags()["images"]
    assert "receptive_field/summary" in tags
    maps = [tag for tag in tags if tag != "receptive_field/summary"]
    assert maps and all([i.step for i in events.Images(tag)] == [0, 1, 2] for tag in maps)
