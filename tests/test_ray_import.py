"""Executors import Ray with Spark's JARs off ``sys.path`` (``_ray.import_ray``): with tqdm
installed, ``import ray`` reads package metadata, which opens every zip on the path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path


def test_import_ray_skips_jars_and_puts_the_path_back(tmp_path: Path) -> None:
    """In a fresh interpreter whose path holds a JAR (as Spark's Python workers' does), the
    import never opens it, and the path afterwards is the one before."""
    jar = tmp_path / "some-package.jar"
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    code = (
        "import sys, zipfile\n"
        f"sys.path.insert(0, {str(jar)!r})\n"
        "before = list(sys.path)\n"
        "opened = []\n"
        "orig = zipfile.ZipFile.__init__\n"
        "def spy(self, file, *a, **k):\n"
        "    opened.append(str(file)); return orig(self, file, *a, **k)\n"
        "zipfile.ZipFile.__init__ = spy\n"
        "from spark_ray_udf._ray import import_ray\n"
        "ray = import_ray()\n"
        "assert sys.path[: len(before)] == before, (sys.path, before)  # ray adds its thirdparty_files\n"
        f"assert not any({str(jar)!r} in f for f in opened), opened\n"
        "print('ok', ray.__name__)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "ok ray" in proc.stdout, proc.stderr[-3000:]
