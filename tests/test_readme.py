"""The README's two commands are the ones that work: CI runs the test command, the config exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    main_job, tests = commands()
    assert main_job.endswith("python train.py") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_screenshot_is_in_the_repository():
    assert (ROOT / "docs" / "tensorboard.png").stat().st_size > 10_000
