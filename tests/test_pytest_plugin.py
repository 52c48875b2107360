"""The pytest plugin: a user's test gets spark, ray_address and ray_model without a conftest."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The example test file in README.md (the python block starting ``# test_my_model.py``)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# test_my_model\.py\n.*?)```", text, re.S)
    assert match, "README.md lost its pytest example"
    return match.group(1)


def test_entry_point_is_installed():
    """pytest finds the plugin through the installed metadata (``pip install -e .`` again after
    pyproject.toml gained the entry point)."""
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("spark_ray_udf.testing") == "spark_ray_udf.testing", (
        f"no pytest11 entry point spark_ray_udf.testing (found {found}); reinstall: pip install -e ."
    )


@pytest.mark.slow
def test_readme_example_runs_alone_in_an_empty_folder(tmp_path):
    """The README's 10-line test, alone in a folder without conftest.py, passes with
    ``python -m pytest`` (its own Spark and Ray)."""
    (tmp_path / "test_my_model.py").write_text(readme_example())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_model.py"],
        cwd=tmp_path, env=helpers.subprocess_env(), capture_output=True, text=True, timeout=480,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]
