"""One copy of the model's files per machine: the actors serving one table version share one
folder, written once under a lock and removed by the last of them."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from spark_ray_udf import _shared, register_ray_model
from spark_ray_udf.store import Manifest, ModelFile
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers


def _racer(root: str, counter: str, out: "multiprocessing.Queue[str]") -> None:
    def fill(d: Path) -> None:
        with open(counter, "a") as f:  # one line per fill
            f.write(f"{os.getpid()}\n")
        (d / "w.bin").write_bytes(b"0123456789")

    m = Manifest(files=(ModelFile("w.bin", 10, "x", 1),), dirs=(), chunk_size=16)
    folder = _shared.acquire("race", m, fill, timeout_s=30, where="t@v0", root=Path(root))
    out.put(str(folder))


def test_concurrent_processes_fill_once(tmp_path):
    """Six processes acquire the same folder at once: it is written exactly once, all get it;
    the holders of the exited processes are swept, and with them the folder."""
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[str] = ctx.Queue()
    counter = tmp_path / "fills"
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "root"), str(counter), out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    folders = {out.get(timeout=5) for _ in procs}
    assert len(folders) == 1 and len(counter.read_text().splitlines()) == 1
    folder = Path(folders.pop())
    assert (folder / "w.bin").read_bytes() == b"0123456789"
    assert _shared.sweep(tmp_path / "root") == [folder]  # every holder exited without release
    assert not folder.exists()


def test_actors_of_one_version_share_one_folder(spark, linear_table):
    """Two actors of a pool and one of another pool of the same version: one folder, the same
    files (inodes); it outlives the first pool's close and goes with the last actor."""
    with register_ray_model(
        spark, linear_table.table, "shared_a", init_linear, apply_linear, return_type="bigint",
        num_actors=2,
    ) as a:
        dirs_a = {info.model_dir for info in a.actors}
        assert len(dirs_a) == 1
        folder = Path(dirs_a.pop())
        assert folder.is_relative_to(_shared.models_root())
        with register_ray_model(
            spark, linear_table.table, "shared_b", init_linear, apply_linear, return_type="bigint",
            num_actors=1,
        ) as b:
            assert b.actors[0].model_dir == str(folder)
            a.close()
            assert (folder / "weights.npy").is_file(), "still held by shared_b's actor"
            spark.sql(
                f"select {helpers.features_sql()} as features from range(20)"
            ).createOrReplaceTempView("shared_events")
            assert len(spark.sql("select shared_b(features) from shared_events").collect()) == 20
        helpers.wait_for(lambda: not folder.exists(), 30, "the last actor to remove the folder")


def test_private_folders_when_asked(spark, linear_table):
    """share_model_files=False: each actor has its own folder under the pool's work root."""
    with register_ray_model(
        spark, linear_table.table, "shared_off", init_linear, apply_linear, return_type="bigint",
        num_actors=2, share_model_files=False,
    ) as model:
        dirs = [info.model_dir for info in model.actors]
        assert len(set(dirs)) == 2
        assert all(Path(d).is_relative_to(model._pool.work_root) for d in dirs)
