"""Hostile tables, threads and results (issue 11): what an adversarial or unlucky user does
through the public API, with real Spark, Ray and Delta where the path needs them.

* the embedded Ray started from a thread that then exits (own Spark and Ray in a subprocess, so
  a Ray that ends its driver cannot take pytest with it);
* model tables whose manifest or chunk rows lie (types, sizes, counts, paths, a 1 TiB file);
* a model of 20,000+ small files (bounded open files);
* symbolic links in a model folder;
* results too large for one Arrow array, and the fallbacks that used to be silent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parent.parent


def run_script(tmp_path: Path, name: str, text: str, *, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run ``text`` as a script (argument: ``tmp_path``); return the JSON it printed after
    ``RESULT ``, or fail with its output and exit status."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# 11.3 The embedded Ray outlives the thread that started it
# --------------------------------------------------------------------------------------------

# Ray ends a driver whose GCS stays unreachable for gcs_rpc_server_reconnect_timeout_s (60 s by
# default); the app lowers it to RECONNECT_S so that "still alive a minute later" takes seconds.
RECONNECT_S = 10

THREAD_APP = """
import json, sys, threading, time
from pathlib import Path

import psutil

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, local_spark, make_linear_model
from tests import helpers

tmp = Path(sys.argv[1])
spark = local_spark("ray-thread", warehouse_dir=str(tmp / "wh"))
linear = make_linear_model(tmp / "m")
save_model(spark, tmp / "m", str(tmp / "model"))
df = spark.range(0, 200, 1, 2).selectExpr("id", helpers.features_sql() + " as features")
expected = helpers.expected_classes(linear, list(range(200)))
box = {}

def first_registration():  # a web handler, a scheduler job, a notebook's background task
    box["model"] = register_ray_model(
        spark, str(tmp / "model"), "model_thread", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    )
    box["thread_rows"] = [r.c for r in sorted(df.select("id", box["model"]("features").alias("c")).collect())]

t = threading.Thread(target=first_registration, name="first-registration")
t.start()
t.join(300)
model = box["model"]
gone_at = time.monotonic()
out = {"thread_ok": box["thread_rows"] == expected, "thread_alive": t.is_alive()}
# Past Ray's reconnect limit: with a Ray tied to the ended thread, Ray ends this process here.
time.sleep(RECONNECT_S + 5)
ray_names = {p.name() for p in psutil.Process().children(recursive=True)
             if p.status() != psutil.STATUS_ZOMBIE}
out["ray_processes"] = sorted(n for n in ray_names if n in ("gcs_server", "raylet"))
rows = [r.c for r in sorted(df.select("id", model("features").alias("c")).collect())]
out["later_ok"] = rows == expected
out["seconds_after_thread"] = time.monotonic() - gone_at
model.close()
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


@pytest.mark.slow
def test_embedded_ray_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    """The first register_ray_model runs in a thread that then exits (own Spark and Ray in a
    subprocess): Ray's GCS and raylet live on, a query after Ray's reconnect limit still gives
    the model's predictions, and the driver was not ended by Ray."""
    env = {**helpers.subprocess_env(), "RAY_gcs_rpc_server_reconnect_timeout_s": str(RECONNECT_S)}
    out = run_script(
        tmp_path, "thread_app.py", THREAD_APP.replace("RECONNECT_S", str(RECONNECT_S)),
        env=env, timeout_s=480,
    )
    assert out["thread_ok"] and not out["thread_alive"]
    assert out["ray_processes"] == ["gcs_server", "raylet"], out
    assert out["later_ok"], "a query after the registering thread ended must be served"
    assert out["seconds_after_thread"] > RECONNECT_S


# --------------------------------------------------------------------------------------------
# 11.4 The manifest is parsed against a schema (pure: no Spark)
# --------------------------------------------------------------------------------------------

SHA = "ab" * 32


def manifest_doc(**changes: Any) -> dict[str, Any]:
    """A valid manifest document (two files, one folder), with ``changes`` applied."""
    doc: dict[str, Any] = {
        "format": "spark-ray-udf/1",
        "chunk_size": 4,
        "files": [
            {"path": "w.bin", "size": 10, "sha256": SHA, "num_chunks": 3},
            {"path": "sub/config.json", "size": 0, "sha256": SHA, "num_chunks": 1},
        ],
        "dirs": ["sub", "assets"],
        "created": "2026-12-01T00:00:00Z",
        "source": "model",
    }
    doc.update(changes)
    return doc


def with_file(**changes: Any) -> dict[str, Any]:
    """The manifest with its first file entry changed (a value of None drops the field)."""
    doc = manifest_doc()
    entry = dict(doc["files"][0], **changes)
    doc["files"][0] = {k: v for k, v in entry.items() if v is not None}
    return doc


def test_valid_manifest_parses() -> None:
    """The reference document parses (so every refusal below is the change it makes)."""
    from spark_ray_udf.store import parse_manifest

    m = parse_manifest(manifest_doc(), where="t@v1")
    assert [f.path for f in m.files] == ["w.bin", "sub/config.json"] and m.dirs == ("sub", "assets")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", r"the manifest row is unreadable \(a JSON list, expected an object\)"),
        (b'"spark-ray-udf/1"', r"the manifest row is unreadable \(a JSON string, expected an object\)"),
        (b"null", r"the manifest row is unreadable \(a JSON null, expected an object\)"),
        (b"[" * 100_000 + b"]" * 100_000, r"the manifest row is unreadable \(RecursionError"),
        (b'{"format": "spark-ray-udf/1", "chunk_size": 4, "files": [', r"the manifest row is unreadable \(JSONDecodeError"),
        (b"\xff\xfe{", r"the manifest row is unreadable \("),
        (json.dumps({"format": "spark-ray-udf/1", "chunk_size": 4}).encode(),
         r"the manifest's field 'files' must be a list of at most 1000000 entries \(got None\)"),
    ],
)
def test_manifest_that_is_not_an_object(body: bytes, message: str) -> None:
    """A JSON list, string or null, a deeply nested or cut document, or bytes that are not UTF-8:
    ModelTableError naming table@version (not AttributeError, RecursionError or TypeError)."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import Manifest

    with pytest.raises(ModelTableError, match=rf"^db.t@v7: {message}") as info:
        Manifest.from_json(body, where="db.t@v7")
    assert "re-save the model" in str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (manifest_doc(chunk_size="4"), r"the manifest's field 'chunk_size' must be an integer in 1\.\.536870912 \(got '4' that is a str\)"),
        (manifest_doc(chunk_size=0), r"the manifest's field 'chunk_size' must be an integer in 1\.\.536870912 \(got 0"),
        (manifest_doc(chunk_size=4.0), r"the manifest's field 'chunk_size' must be an integer .*that is a float"),
        (manifest_doc(dirs="sub"), r"the manifest's field 'dirs' must be a list"),
        (manifest_doc(files={"w.bin": 1}), r"the manifest's field 'files' must be a list"),
        (manifest_doc(extra=1), r"the manifest has unknown fields \['extra'\]"),
        (manifest_doc(format="spark-ray-udf/2"), r"the manifest row is unreadable \(format is 'spark-ray-udf/2'"),
        (manifest_doc(created=7), r"the manifest's field 'created' must be a string"),
        (manifest_doc(files=["w.bin"]), r"entry 0 of the manifest's 'files' must be an object \(got 'w.bin'\)"),
        (manifest_doc(dirs=[3]), r"entry 0 of the manifest's 'dirs' must be a string \(got 3\)"),
        (with_file(path=5), r"entry 0 of the manifest's 'files': field 'path' must be a string \(got 5\)"),
        (with_file(size="10"), r"file 'w.bin' in the manifest: field 'size' must be an integer in 0\.\.68719476736 \(got '10' that is a str\)"),
        (with_file(size=True), r"file 'w.bin' in the manifest: field 'size' must be an integer .*that is a bool"),
        (with_file(size=-1), r"file 'w.bin' in the manifest: field 'size' must be an integer in 0\.\."),
        (with_file(size=10.5), r"file 'w.bin' in the manifest: field 'size' must be an integer"),
        (with_file(num_chunks="3"), r"file 'w.bin' in the manifest: field 'num_chunks' must be an integer in 1\.\.3 \(got '3'"),
        (with_file(num_chunks=1), r"file 'w.bin' in the manifest: field 'num_chunks' is 1, but its size 10 in chunks of 4 bytes makes 3"),
        (with_file(num_chunks=4), r"file 'w.bin' in the manifest: field 'num_chunks' must be an integer in 1\.\.3 \(got 4"),
        (with_file(sha256="AB" * 32), r"file 'w.bin' in the manifest: field 'sha256' must be 64 lowercase hex digits"),
        (with_file(sha256=None), r"file 'w.bin' in the manifest: fields must be \['num_chunks', 'path', 'sha256', 'size'\]"),
        (with_file(mode=0o755), r"file 'w.bin' in the manifest: fields must be"),
        (with_file(path="a" * 300), r"stored path 'a+\.\.\. has a name of 300 bytes \('a+\.\.\.\), more than 255"),
        (with_file(path="/".join(["abcdefghij"] * 100)), r"stored path .* is 1099 bytes long, more than 1024"),
        (with_file(path="ok/\udcff.bin"), r"stored path .* is not valid UTF-8"),
        (with_file(path="../w.bin"), r"stored path '\.\./w\.bin' escapes the model folder"),
        (with_file(path="sub"), r"the manifest lists 'sub' twice \(as a file and as a folder\)"),
        (with_file(path="sub/config.json"), r"the manifest lists the file 'sub/config.json' twice"),
        (with_file(path="sub/config.json/x"), r"the manifest lists 'sub/config.json' as a file and 'sub/config.json/x' inside it"),
        (manifest_doc(dirs=["w.bin/inner"]), r"the manifest lists 'w.bin' as a file and 'w.bin/inner' inside it"),
        (manifest_doc(dirs=["sub", "sub"]), r"the manifest lists 'sub' twice \(as a folder\)"),
    ],
)
def test_manifest_schema_refusals(doc: dict[str, Any], message: str) -> None:
    """Wrong types (string numbers included), sizes, counts, unknown or missing fields, long or
    escaping paths, duplicates and file-vs-folder clashes: ModelTableError naming table@version,
    the file and the field."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import Manifest

    with pytest.raises(ModelTableError, match=rf"^db.t@v7: ({message})") as info:
        Manifest.from_json(json.dumps(doc).encode(), where="db.t@v7")
    assert "re-save the model" in str(info.value)


def test_manifest_total_size_limit_is_the_callers() -> None:
    """Sizes adding up past max_model_bytes are refused naming the file that crosses it and the
    fix; a caller who raises the limit gets the manifest."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import DEFAULT_MAX_MODEL_BYTES, Manifest

    tib = 1 << 40
    doc = manifest_doc(chunk_size=1 << 29, files=[
        {"path": "a.bin", "size": 40 << 30, "sha256": SHA, "num_chunks": 80},
        {"path": "b.bin", "size": 40 << 30, "sha256": SHA, "num_chunks": 80},
    ])
    body = json.dumps(doc).encode()
    assert DEFAULT_MAX_MODEL_BYTES == 64 << 30
    with pytest.raises(ModelTableError, match=r"^t@v0: the model's files add up to more than max_model_bytes=68719476736 \(at least 85899345920 bytes, reached at file 'b.bin', field 'size'\); if the model really is this large, pass a larger max_model_bytes= to register_ray_model\(\)"):
        Manifest.from_json(body, where="t@v0")
    assert Manifest.from_json(body, where="t@v0", max_model_bytes=tib).total_bytes == 80 << 30
    one_tib = manifest_doc(chunk_size=1 << 29, files=[{"path": "huge", "size": tib, "sha256": SHA, "num_chunks": 2048}])
    with pytest.raises(ModelTableError, match=r"file 'huge' in the manifest: field 'size' must be an integer in 0\.\.68719476736 \(got 1099511627776"):
        Manifest.from_json(json.dumps(one_tib).encode(), where="t@v0")


# --------------------------------------------------------------------------------------------
# 11.4 Chunk rows are checked against the manifest while streaming (pure: write_model)
# --------------------------------------------------------------------------------------------

TIB = 1 << 40


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_manifest() -> Any:
    from spark_ray_udf.store import Manifest, ModelFile

    return Manifest(files=(ModelFile("w.bin", 10, sha(b"0123456789"), 3),), dirs=(), chunk_size=4)


def test_a_chunk_declaring_a_terabyte_before_the_manifest_fails_at_once(tmp_path: Path) -> None:
    """A first row that declares a 1 TiB file (no manifest seen yet) is refused by the total-size
    limit; with the limit raised, by its length (10 bytes cannot be a 1 TiB file in one chunk);
    in both cases before any file is created."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import ChunkRow, write_model

    data = b"0123456789"
    liar = ChunkRow("file", "huge.bin", 0, 1, TIB, sha(data), sha(data), data)
    start = time.monotonic()
    with pytest.raises(ModelTableError, match=r"^t@v1: the model's files add up to more than max_model_bytes=68719476736 \(at least 1099511627776 bytes, reached at file 'huge.bin'"):
        write_model(iter([liar]), tmp_path, where="t@v1")
    with pytest.raises(ModelTableError, match=r"^t@v1: chunk 0 of 'huge.bin' holds 10 bytes, which cannot be chunk 0 of a file of 1099511627776 bytes in 1 chunks \(fields file_size, num_chunks\)"):
        write_model(iter([liar]), tmp_path, where="t@v1", max_model_bytes=2 * TIB)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_a_lying_chunk_after_the_manifest_fails_at_its_row(tmp_path: Path) -> None:
    """Once the manifest is known, a chunk whose size facts or length disagree with it is refused
    at that row: nothing of it is written."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import ChunkRow, write_model

    m = small_manifest()
    head = ChunkRow("manifest", "", 0, 1, 0, "", "", m.to_json())
    body = b"0123456789"
    good = ChunkRow("file", "w.bin", 0, 3, 10, sha(body), sha(b"0123"), b"0123")
    tera = good._replace(file_size=TIB)
    with pytest.raises(ModelTableError, match=r"^t@v1: a row of 'w.bin' has file_size=1099511627776, but the manifest lists 10; re-save"):
        write_model(iter([head, tera]), tmp_path / "a", where="t@v1")
    short = good._replace(data=b"012", chunk_sha256=sha(b"012"))
    with pytest.raises(ModelTableError, match=r"^t@v1: chunk 0 of 'w.bin' holds 3 bytes, but the manifest's file size 10 and chunk size 4 make it 4 \(field 'data'\)"):
        write_model(iter([head, short]), tmp_path / "b", where="t@v1")
    stranger = good._replace(path="other.bin")
    with pytest.raises(ModelTableError, match=r"^t@v1: rows of 'other.bin' are not in the manifest"):
        write_model(iter([head, stranger]), tmp_path / "c", where="t@v1")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_actor_side_checks_rows_against_the_drivers_manifest(tmp_path: Path) -> None:
    """With ``expected`` (the manifest the driver checked), a table whose manifest row was
    rewritten since is refused at that row, before any chunk is written."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import ChunkRow, Manifest, ModelFile, write_model

    m = small_manifest()
    other = Manifest(files=(ModelFile("w.bin", TIB, sha(b"x"), TIB // 4),), dirs=(), chunk_size=4)
    rows = [ChunkRow("manifest", "", 0, 1, 0, "", "", other.to_json())]
    with pytest.raises(ModelTableError, match=r"^t@v1: the manifest row differs from the one read at registration"):
        write_model(iter(rows), tmp_path, where="t@v1", expected=m)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chunk_index": "0"}, r"a row of 'w.bin' has chunk_index='0', expected an integer"),
        ({"num_chunks": None}, r"a row of 'w.bin' has num_chunks=None, expected an integer"),
        ({"file_size": 10.0}, r"a row of 'w.bin' has file_size=10.0, expected an integer"),
        ({"chunk_sha256": None}, r"a row of 'w.bin' has chunk_sha256=None, expected a string"),
        ({"path": 7}, r"stored path 7 is a int, not a string"),
        ({"kind": None}, r"row of unknown kind None"),
        ({"chunk_index": 5}, r"chunk 5 of 'w.bin' is out of range \(the file has 3 chunks\)"),
    ],
)
def test_rows_of_the_wrong_type(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    """Rows whose fields have the wrong type or range: ModelTableError naming the file and the
    field (not TypeError)."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import ChunkRow, write_model

    row = ChunkRow("file", "w.bin", 0, 3, 10, sha(b"0123456789"), sha(b"0123"), b"0123")._replace(**change)
    with pytest.raises(ModelTableError, match=rf"^t@v1: {message}"):
        write_model(iter([row]), tmp_path, where="t@v1")


def test_file_and_folder_clash_before_the_manifest(tmp_path: Path) -> None:
    """Rows (before any manifest) of 'a' and of 'a/b': ModelTableError naming the path, not
    FileExistsError / NotADirectoryError."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import ChunkRow, write_model

    rows = [ChunkRow("file", p, 0, 1, 1, sha(b"x"), sha(b"x"), b"x") for p in ("a", "a/b")]
    with pytest.raises(ModelTableError, match=r"^t@v1: cannot write 'a/b' \(.*\): the table lists a path that is both a file and a folder"):
        write_model(iter(rows), tmp_path / "one", where="t@v1")
    with pytest.raises(ModelTableError, match=r"^t@v1: cannot write 'a' \(.*\): the table lists a path that is both a file and a folder"):
        write_model(iter(rows[::-1]), tmp_path / "two", where="t@v1")


# --------------------------------------------------------------------------------------------
# 11.4 Lying tables through real Spark, Delta and Ray
# --------------------------------------------------------------------------------------------


def rewrite(spark: Any, table: str, edit: Any) -> int:
    """Commit ``edit(rows)`` of the latest rows of ``table`` as a new version; return it."""
    from spark_ray_udf.store import latest_version

    df = spark.read.format("delta").load(table)
    rows = [r.asDict() for r in df.collect()]
    spark.createDataFrame(edit(rows), schema=df.schema).write.format("delta").mode("overwrite").save(table)
    return latest_version(spark, table)


def lie_about(path: str, size: int, *, in_manifest: bool) -> Any:
    """An edit making every row of ``path`` (and, with ``in_manifest``, its manifest entry, with
    a matching chunk count) declare ``size`` bytes."""

    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        manifest = next(r for r in rows if r["kind"] == "manifest")
        doc = json.loads(manifest["data"])
        entry = next(f for f in doc["files"] if f["path"] == path)
        n = -(-size // doc["chunk_size"]) if in_manifest else entry["num_chunks"]
        if in_manifest:
            entry.update(size=size, num_chunks=n)
            manifest["data"] = json.dumps(doc).encode()
        for r in rows:
            if r["kind"] == "file" and r["path"] == path:
                r.update(file_size=size, num_chunks=n if in_manifest else 1)
        return rows

    return edit


@pytest.fixture
def small_table(spark: Any, tmp_path: Path) -> str:
    """A path table holding the linear model and a 3500-byte ``blob.bin`` (chunks of 1000
    bytes), version 0."""
    from spark_ray_udf import save_model
    from spark_ray_udf.testing import make_linear_model

    make_linear_model(tmp_path / "m")
    (tmp_path / "m" / "blob.bin").write_bytes(os.urandom(3500))
    table = str(tmp_path / "table")
    save_model(spark, tmp_path / "m", table, chunk_size=1000)
    return table


def test_a_terabyte_manifest_is_refused_on_the_driver_before_any_actor(spark: Any, ray_address: str, small_table: str) -> None:
    """A table whose manifest (and rows) declare a 1 TiB file: register_ray_model refuses it on
    the driver, naming table@version, file and field, within seconds and before any actor
    process starts; load_model and read_model refuse it the same way."""
    from spark_ray_udf import register_ray_model
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import load_model, read_model
    from spark_ray_udf.testing import apply_linear, init_linear

    v = rewrite(spark, small_table, lie_about("weights.npy", TIB, in_manifest=True))
    before = helpers.actor_processes("ModelWorker")
    message = rf"^{small_table}@v{v}: file 'weights.npy' in the manifest: field 'size' must be an integer in 0\.\.68719476736 \(got 1099511627776"
    start = time.monotonic()
    with pytest.raises(ModelTableError, match=message):
        register_ray_model(spark, small_table, "hostile_tib", init_linear, apply_linear, return_type="bigint", num_actors=1)
    assert time.monotonic() - start < 60
    assert helpers.actor_processes("ModelWorker") <= before, "no actor may start for a refused table"
    with pytest.raises(ModelTableError, match=message):
        read_model(spark, small_table, sink=lambda p, i, d: None)
    with pytest.raises(ModelTableError, match=message):
        load_model(spark, small_table, Path(small_table).parent / "out")


def test_a_terabyte_chunk_fails_in_seconds_without_a_sparse_file(spark: Any, small_table: str, tmp_path: Path) -> None:
    """The rows of one file say 1 TiB in one chunk, the manifest says otherwise: refused at
    that file's first row. And with the manifest lying too and max_model_bytes raised to 2 TiB:
    refused at the first chunk whose length cannot be right; no file ever grows past the bytes
    really written (the old reader wrote, then hashed, a sparse 1 TiB file)."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import load_model, locate_model, rows_from_files, write_model

    v1 = rewrite(spark, small_table, lie_about("blob.bin", TIB, in_manifest=False))
    start = time.monotonic()
    with pytest.raises(ModelTableError, match=rf"^{small_table}@v{v1}: a row of 'blob.bin' has num_chunks=1, but the manifest lists 4; re-save"):
        load_model(spark, small_table, tmp_path / "out1")
    v2 = rewrite(spark, small_table, lie_about("blob.bin", TIB, in_manifest=True))
    located = locate_model(spark, small_table, v2, max_model_bytes=2 * TIB)
    assert located is not None
    dest = tmp_path / "out2"
    dest.mkdir()
    with pytest.raises(ModelTableError, match=rf"^t@v{v2}: chunk 3 of 'blob.bin' holds 500 bytes, but the manifest's file size 1099511627776 and chunk size 1000 make it 1000 \(field 'data'\)"):
        write_model(rows_from_files(located.files, where=f"t@v{v2}"), dest, where=f"t@v{v2}", max_model_bytes=2 * TIB)
    assert time.monotonic() - start < 60
    sizes = {p.name: p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    assert all(size <= 10_000 for size in sizes.values()), sizes


# --------------------------------------------------------------------------------------------
# 11.4 Bounded open files: a model of 20,100 small files saves and loads
# --------------------------------------------------------------------------------------------

N_SMALL_FILES = 20_100


@contextlib.contextmanager
def open_files_limit(extra: int) -> Iterator[int]:
    """Lower this process's soft limit of open files to what it has open now plus ``extra``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + extra
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, soft), hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_a_model_of_20100_small_files_saves_and_loads(spark: Any, tmp_path: Path) -> None:
    """20,100 files in 201 folders: save_model, then load_model with this process allowed only
    500 more open files than it has (the reader used to hold one per model file until the whole
    table was read: "Too many open files"), byte for byte."""
    from spark_ray_udf import load_model, save_model

    src = tmp_path / "many"
    for i in range(N_SMALL_FILES):
        folder = src / f"d{i // 100:03d}"
        if i % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{i:05d}.txt").write_bytes(f"file {i}\n".encode())
    table = str(tmp_path / "table")
    version = save_model(spark, src, table)
    out = tmp_path / "out"
    with open_files_limit(500):
        stored = load_model(spark, table, out)
    assert stored.version == version and len(stored.manifest.files) == N_SMALL_FILES
    loaded = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt"))
    assert loaded == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.txt"))
    assert (out / "d123" / "f12345.txt").read_bytes() == b"file 12345\n"


def test_write_model_keeps_at_most_max_open_files_open(tmp_path: Path) -> None:
    """Rows of 300 files interleaved (every file's first chunk, then every second chunk): the
    writer never has more than MAX_OPEN_FILES files open, and every file is right."""
    from spark_ray_udf.store import MAX_OPEN_FILES, ChunkRow, Manifest, ModelFile, write_model

    bodies = {f"f{i:03d}": os.urandom(7) for i in range(300)}
    m = Manifest(files=tuple(ModelFile(p, 7, sha(b), 2) for p, b in bodies.items()), dirs=(), chunk_size=4)
    rows = [ChunkRow("manifest", "", 0, 1, 0, "", "", m.to_json())]
    for idx, part in ((0, slice(0, 4)), (1, slice(4, 7))):
        rows += [ChunkRow("file", p, idx, 2, 7, sha(b), sha(b[part]), b[part]) for p, b in bodies.items()]
    peak = 0

    def open_under(folder: Path) -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/")
            except OSError:  # closed meanwhile (the listing's own descriptor)
                pass
        return count

    def counting() -> Iterator[Any]:
        nonlocal peak
        for r in rows:
            peak = max(peak, open_under(tmp_path))
            yield r

    assert write_model(counting(), tmp_path, where="t@v0") == m
    assert 0 < peak <= MAX_OPEN_FILES
    assert all((tmp_path / p).read_bytes() == b for p, b in bodies.items())


# --------------------------------------------------------------------------------------------
# 11.7 Symbolic links in a model folder
# --------------------------------------------------------------------------------------------


def test_save_refuses_a_link_out_of_the_folder_naming_it(spark: Any, tmp_path: Path) -> None:
    """A file link and a folder link pointing outside the model folder are refused by default,
    naming the link and its target, before any table is written; follow_symlinks=True stores
    the outside target's bytes."""
    from spark_ray_udf import load_model, save_model
    from spark_ray_udf.errors import ModelTableError

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside bytes")
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"w")
    (src / "sub" / "leak.txt").symlink_to(secret)
    table = str(tmp_path / "table")
    with pytest.raises(ModelTableError, match=rf"^{src}: 'sub/leak.txt' is a symbolic link to {secret}, outside the model folder; .*pass follow_symlinks=True"):
        save_model(spark, src, table)
    assert not Path(table).exists()
    (src / "sub" / "leak.txt").unlink()
    (src / "shared").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ModelTableError, match=rf"^{src}: 'shared' is a symbolic link to {tmp_path}, outside the model folder"):
        save_model(spark, src, table)
    (src / "shared").unlink()
    (src / "sub" / "leak.txt").symlink_to(secret)
    save_model(spark, src, table, follow_symlinks=True)
    load_model(spark, table, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "leak.txt").read_bytes() == b"outside bytes"


def test_links_inside_the_folder_are_stored_as_their_targets_bytes(spark: Any, tmp_path: Path) -> None:
    """A file link and a folder link whose targets are inside the model folder are stored (and
    loaded) as regular files holding the target's bytes; no link comes back."""
    from spark_ray_udf import load_model, save_model

    src = tmp_path / "model"
    (src / "real").mkdir(parents=True)
    (src / "real" / "w.bin").write_bytes(b"weights")
    (src / "alias.bin").symlink_to("real/w.bin")
    (src / "mirror").symlink_to("real", target_is_directory=True)
    table = str(tmp_path / "table")
    save_model(spark, src, table)
    out = tmp_path / "out"
    stored = load_model(spark, table, out)
    assert sorted(f.path for f in stored.manifest.files) == ["alias.bin", "mirror/w.bin", "real/w.bin"]
    for rel in ("alias.bin", "mirror/w.bin", "real/w.bin"):
        assert (out / rel).read_bytes() == b"weights" and not (out / rel).is_symlink()
    assert not (out / "mirror").is_symlink()


def test_walk_refuses_broken_links_and_special_files(tmp_path: Path) -> None:
    """A broken link and a FIFO (whose read would block save_model forever) are refused by name."""
    from spark_ray_udf.errors import ModelTableError
    from spark_ray_udf.store import _walk

    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w")
    (src / "gone").symlink_to("nowhere.bin")
    with pytest.raises(ModelTableError, match=rf"^{src}: 'gone' is a symbolic link to 'nowhere.bin', which does not exist"):
        _walk(src)
    (src / "gone").unlink()
    os.mkfifo(src / "pipe")
    with pytest.raises(ModelTableError, match=rf"^{src}: 'pipe' is not a regular file \(a FIFO, socket or device\)"):
        _walk(src)


# --------------------------------------------------------------------------------------------
# 11.6 Results too large for one Arrow array, wrong nesting: our error, naming function and rows
# --------------------------------------------------------------------------------------------


def huge_strings(total: int) -> Any:
    """A 3-row ``large_string`` array whose values add up to ``total`` bytes, without touching
    them: its data buffer is allocated (pyarrow's allocator maps it lazily) but never written,
    so a 2 GiB result costs almost no memory."""
    import pyarrow as pa

    offsets = pa.array([0, 1, total - 1, total], pa.int64()).buffers()[1]
    return pa.LargeStringArray.from_buffers(3, offsets, pa.allocate_buffer(total))


def test_a_result_past_one_arrow_array_is_refused_at_the_real_boundary() -> None:
    """Strings of exactly MAX_ARRAY_BYTES (2**31 - 1, the 32-bit offsets of Spark's string
    arrays) become one ``string`` array; one byte more is refused with ModelApplyError naming
    the function, the rows and the fix (Spark failed with "iterator of ChunkedArray")."""
    import pyarrow as pa

    from spark_ray_udf._arrow import MAX_ARRAY_BYTES, to_result_array
    from spark_ray_udf.errors import ModelApplyError

    assert MAX_ARRAY_BYTES == 2**31 - 1
    fits = to_result_array(huge_strings(MAX_ARRAY_BYTES), pa.string(), 3, function="fn", row_offset=20)
    assert fits.type == pa.string() and len(fits) == 3
    with pytest.raises(ModelApplyError, match=r"^fn: apply_func's result for rows 20\.\.22: the result holds 2,147,483,648 bytes of strings \(large_string\), more than one Arrow array of a batch can hold \(2,147,483,647\); make the batches smaller: lower spark.sql.execution.arrow.maxRecordsPerBatch \(this batch has 3 rows\)"):
        to_result_array(huge_strings(MAX_ARRAY_BYTES + 1), pa.string(), 3, function="fn", row_offset=20)


def test_a_chunked_result_is_refused_or_combined() -> None:
    """A ChunkedArray result whose chunks together pass the limit is refused (combining them
    raised Arrow's own "offset overflow"); small chunks are combined into one array."""
    import pyarrow as pa

    from spark_ray_udf._arrow import MAX_ARRAY_BYTES, to_result_array
    from spark_ray_udf.errors import ModelApplyError

    half = huge_strings(MAX_ARRAY_BYTES // 2 + 1).cast(pa.string())
    with pytest.raises(ModelApplyError, match=r"^fn: apply_func's result for rows 0\.\.5: the result holds 2,147,483,648 bytes of strings"):
        to_result_array(pa.chunked_array([half, half]), pa.string(), 6, function="fn")
    small = to_result_array(pa.chunked_array([["a"], ["b", "c"]]), pa.string(), 3, function="fn")
    assert isinstance(small, pa.Array) and small.to_pylist() == ["a", "b", "c"]


def test_too_many_array_elements_are_refused_without_building_them() -> None:
    """A 2-D result of more than 2**31 - 1 elements (a broadcast view: no memory) for an array
    type is refused before Arrow builds (and overflows) its offsets."""
    import numpy as np
    import pyarrow as pa

    from spark_ray_udf._arrow import to_result_array
    from spark_ray_udf.errors import ModelApplyError

    view = np.broadcast_to(np.float32(0), (1 << 16, 1 << 15))
    with pytest.raises(ModelApplyError, match=r"^fn: apply_func's result for rows 0\.\.65535: the result holds 2,147,483,648 array elements \(shape \(65536, 32768\)\)"):
        to_result_array(view, pa.list_(pa.float64()), 1 << 16, function="fn")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("ragged", r"cannot build list<item: list<item: double>> from the result: .*inhomogeneous"),
        ("complex", r"cannot convert values of dtype complex128 to Arrow"),
        ("past 64 bits", r"cannot convert values of dtype object to Arrow \(.*\); round or clip them"),
    ],
)
def test_wrong_nesting_and_values_give_our_error(case: str, message: str) -> None:
    """A ragged nested result, complex numbers, integers past 64 bits: ModelApplyError naming
    the function and rows (numpy's ValueError, Arrow's NotImplementedError or OverflowError
    escaped before)."""
    import numpy as np
    import pyarrow as pa

    from spark_ray_udf._arrow import to_result_array
    from spark_ray_udf.errors import ModelApplyError

    result, return_type = {
        "ragged": ([[[1.0], [2.0, 3.0]], [1.0]], pa.list_(pa.list_(pa.float64()))),
        "complex": (np.array([1j, 2j]), pa.float64()),
        "past 64 bits": (np.array([2**64, 1], dtype=object), pa.int64()),
    }[case]
    with pytest.raises(ModelApplyError, match=rf"^fn: apply_func's result for rows 0\.\.1: {message}"):
        to_result_array(result, return_type, 2, function="fn")


# --------------------------------------------------------------------------------------------
# 11.6 The fallback to the object store is logged and visible
# --------------------------------------------------------------------------------------------


def test_model_source_and_its_reason_are_public(spark: Any, ray_address: str, small_table: str, caplog: Any) -> None:
    """A plain table is served from storage (reason ""); with deletion vectors, model_source=
    'auto' falls back to the object store: logged at WARNING with the reason, and the model
    says so in model_source / model_source_reason (also after reload())."""
    import logging

    from spark_ray_udf import register_ray_model
    from spark_ray_udf.testing import apply_linear, init_linear

    def register() -> Any:
        return register_ray_model(spark, small_table, "hostile_source", init_linear, apply_linear, return_type="bigint", num_actors=1)

    with register() as model:
        assert (model.model_source, model.model_source_reason) == ("storage", "")
        spark.sql(f"ALTER TABLE delta.`{small_table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
        with caplog.at_level(logging.WARNING, logger="spark_ray_udf"):
            model.reload()
        assert model.model_source == "object_store"
        assert "deletionVectors" in model.model_source_reason
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "falls back to the object store" in r.getMessage()]
        assert warned and "deletionVectors" in warned[0].getMessage()
        rows = spark.range(0, 5).selectExpr(helpers.features_sql() + " as f").select(model("f")).collect()
        assert len(rows) == 5
