"""The Delta model store: a model folder <-> rows of a Delta table, with real Spark and Delta."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spark_ray_udf.errors import ModelNotFoundError, ModelTableError, SparkRayUdfError
from spark_ray_udf.store import (
    COLUMNS,
    Manifest,
    ModelFile,
    TableRef,
    _walk,
    check_relative_path,
    latest_version,
    load_model,
    materialize,
    read_model,
    resolve_version,
    save_model,
)

CHUNK = 1000  # small chunks keep the tables tiny while files still span several chunks
DB = f"srudf_store_{uuid.uuid4().hex[:8]}"


def write_model(root: Path, *, seed: int = 0, big_size: int = 3500) -> Path:
    """A model folder with every kind of entry: nested folders, an empty folder, a dotfile,
    an empty file, and a binary file spanning several chunks."""
    data = hashlib.sha256(str(seed).encode()).digest()
    big = (data * (big_size // len(data) + 1))[:big_size]
    big = bytes(b ^ (i % 251) for i, b in enumerate(big))  # not a repeating pattern
    root.mkdir(parents=True)
    (root / "weights.bin").write_bytes(big)
    (root / "config.json").write_text(json.dumps({"seed": seed}))
    (root / ".hidden").write_bytes(b"dotfile " + data[:4])
    (root / "empty.txt").write_bytes(b"")
    (root / "variables" / "deeper").mkdir(parents=True)
    (root / "variables" / "deeper" / "leaf.data").write_bytes(bytes(range(256)) * 2)
    (root / "variables" / "empty_inner").mkdir()
    (root / "assets").mkdir()  # an empty top-level folder
    return root


def snapshot(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every file's bytes and every folder under ``root``, by relative path."""
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs.update((rel / d).as_posix() for d in dirnames)
        for f in filenames:
            files[(rel / f).as_posix()] = (Path(dirpath) / f).read_bytes()
    return files, dirs


def table_rows(spark: Any, table: str, version: int | None = None) -> tuple[list[dict[str, Any]], Any]:
    """All rows of a model table version as dicts, with the table's schema."""
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    df = reader.load(table)
    return [r.asDict() for r in df.collect()], df.schema


def rewrite(spark: Any, table: str, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Commit ``edit`` of the latest rows as a new version of ``table`` (Spark overwrite)."""
    rows, schema = table_rows(spark, table)
    edited = edit(rows)
    spark.createDataFrame(edited, schema=schema).write.format("delta").mode("overwrite").save(table)


def file_row(rows: list[dict[str, Any]], path: str, chunk: int) -> dict[str, Any]:
    return next(r for r in rows if r["kind"] == "file" and r["path"] == path and r["chunk_index"] == chunk)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different model folders (the second has other bytes and a different big file size)."""
    root = tmp_path_factory.mktemp("models")
    return write_model(root / "model_a", seed=1), write_model(root / "model_b", seed=2, big_size=2100)


@pytest.fixture(scope="module")
def versioned_table(spark: Any, models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A path table holding model_a as version 0 and model_b as version 1."""
    table = str(tmp_path_factory.mktemp("tables") / "versioned")
    assert save_model(spark, models[0], table, chunk_size=CHUNK) == 0
    assert save_model(spark, models[1], table, chunk_size=CHUNK) == 1
    return table


@pytest.fixture(scope="module")
def pristine_table(spark: Any, models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A path table holding model_a as its only version; tests corrupt copies of it."""
    table = tmp_path_factory.mktemp("tables") / "pristine"
    assert save_model(spark, models[0], str(table), chunk_size=CHUNK) == 0
    return table


@pytest.fixture
def fresh_table(pristine_table: Path, tmp_path: Path) -> str:
    """A private copy of the pristine table, version 0 only (a path Delta table is self-contained)."""
    table = tmp_path / "table"
    shutil.copytree(pristine_table, table)
    return str(table)


# --------------------------------------------------------------------------------------------
# Round trips and versions
# --------------------------------------------------------------------------------------------


def test_round_trip_is_byte_for_byte(spark: Any, versioned_table: str, models: tuple[Path, Path], tmp_path: Path) -> None:
    """load_model restores every file (dotfile, empty file, multi-chunk binary) and every empty folder."""
    stored = load_model(spark, versioned_table, tmp_path / "out", version=0)
    assert snapshot(tmp_path / "out") == snapshot(models[0])
    assert stored.version == 0 and stored.where == f"{versioned_table}@v0"


def test_manifest_lists_files_dirs_and_chunks(spark: Any, versioned_table: str) -> None:
    """The manifest records each file's size, sha256 and chunk count, the folders and the chunk size."""
    stored = read_model(spark, versioned_table, version=0, sink=lambda p, i, d: None)
    m = stored.manifest
    by_path = {f.path: f for f in m.files}
    assert set(by_path) == {"weights.bin", "config.json", ".hidden", "empty.txt", "variables/deeper/leaf.data"}
    assert by_path["weights.bin"].size == 3500 and by_path["weights.bin"].num_chunks == 4
    assert by_path["empty.txt"].size == 0 and by_path["empty.txt"].num_chunks == 1
    assert by_path["empty.txt"].sha256 == hashlib.sha256(b"").hexdigest()
    assert set(m.dirs) == {"assets", "variables", "variables/deeper", "variables/empty_inner"}
    assert m.chunk_size == CHUNK and m.source == "model_a"
    assert m.total_bytes == sum(f.size for f in m.files)


def test_chunks_are_at_most_chunk_size(spark: Any, versioned_table: str) -> None:
    """Every stored chunk holds at most chunk_size bytes and the table has the documented columns."""
    rows, schema = table_rows(spark, versioned_table, version=0)
    assert tuple(schema.names) == COLUMNS
    sizes = [len(r["data"]) for r in rows if r["kind"] == "file"]
    assert max(sizes) == CHUNK
    assert [r["kind"] for r in rows].count("manifest") == 1


def test_overwrite_keeps_old_version_readable(spark: Any, versioned_table: str, models: tuple[Path, Path], tmp_path: Path) -> None:
    """After overwriting, version=0 gives the old bytes and version=None the new ones."""
    assert latest_version(spark, versioned_table) == 1
    old = load_model(spark, versioned_table, tmp_path / "v0", version=0)
    new = load_model(spark, versioned_table, tmp_path / "latest")
    assert (old.version, new.version) == (0, 1)
    assert snapshot(tmp_path / "v0") == snapshot(models[0])
    assert snapshot(tmp_path / "latest") == snapshot(models[1])
    assert snapshot(models[0])[0]["weights.bin"] != snapshot(models[1])[0]["weights.bin"]


def test_read_model_sink_gets_every_chunk_once(spark: Any, versioned_table: str, models: tuple[Path, Path]) -> None:
    """read_model hands each chunk to the sink exactly once; the chunks rebuild every file."""
    calls: list[tuple[str, int]] = []
    data: dict[tuple[str, int], bytes] = {}

    def sink(path: str, idx: int, chunk: bytes) -> str:
        calls.append((path, idx))
        data[(path, idx)] = chunk
        return f"{path}#{idx}"

    stored = read_model(spark, versioned_table, version=1, sink=sink)
    expected = {(f.path, i) for f in stored.manifest.files for i in range(f.num_chunks)}
    assert len(calls) == len(set(calls)) == len(expected)
    assert set(calls) == expected
    assert stored.chunks == {key: f"{key[0]}#{key[1]}" for key in expected}
    files, _ = snapshot(models[1])
    for f in stored.manifest.files:
        assert b"".join(data[(f.path, i)] for i in range(f.num_chunks)) == files[f.path]


def test_metastore_name_round_trip_and_versions(spark: Any, models: tuple[Path, Path], tmp_path: Path) -> None:
    """A db.table name works like a path: the database is created, versions are kept."""
    table = f"{DB}.model"
    assert save_model(spark, models[0], table, chunk_size=CHUNK) == 0
    assert save_model(spark, models[1], table, chunk_size=CHUNK) == 1
    assert resolve_version(spark, table, None) == 1
    load_model(spark, table, tmp_path / "v0", version=0)
    load_model(spark, table, tmp_path / "v1")
    assert snapshot(tmp_path / "v0") == snapshot(models[0])
    assert snapshot(tmp_path / "v1") == snapshot(models[1])


def test_load_into_non_empty_folder_is_refused(spark: Any, versioned_table: str, tmp_path: Path) -> None:
    """load_model does not mix a model into a folder that already holds files."""
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        load_model(spark, versioned_table, tmp_path / "busy")


# --------------------------------------------------------------------------------------------
# Refusals: missing tables and versions
# --------------------------------------------------------------------------------------------


def test_unknown_path_table(spark: Any, tmp_path: Path) -> None:
    """A path without a Delta table raises ModelNotFoundError naming the path."""
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(ModelNotFoundError, match=rf"^{missing}: no Delta table at this path"):
        load_model(spark, missing, tmp_path / "out")


def test_non_delta_path_table(spark: Any, tmp_path: Path) -> None:
    """A folder of plain Parquet is not a model table."""
    path = str(tmp_path / "plain")
    spark.range(2).write.parquet(path)
    with pytest.raises(ModelNotFoundError, match="no Delta table at this path"):
        read_model(spark, path, sink=lambda p, i, d: None)


@pytest.mark.parametrize("name", [f"{DB}.no_such_model", "srudf_no_such_db.model"])
def test_unknown_metastore_table(spark: Any, name: str, tmp_path: Path) -> None:
    """An unknown db.table (known or unknown database) raises ModelNotFoundError naming it."""
    with pytest.raises(ModelNotFoundError, match=rf"^{name}: no such table in the metastore"):
        load_model(spark, name, tmp_path / "out")


def test_non_delta_metastore_table(spark: Any) -> None:
    """A metastore table in another format is refused as not a Delta table."""
    name = f"{DB}.plain_parquet"
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
    spark.range(2).write.format("parquet").saveAsTable(name)
    with pytest.raises(ModelTableError, match=rf"^{name}: not a Delta table"):
        read_model(spark, name, sink=lambda p, i, d: None)


@pytest.mark.parametrize("version", [2, 17, -1, True, "0", 0.0])
def test_version_out_of_range(spark: Any, versioned_table: str, version: Any, tmp_path: Path) -> None:
    """A version outside 0..latest (or not an int) is refused naming the table, the version and the range."""
    with pytest.raises(ModelNotFoundError) as info:
        load_model(spark, versioned_table, tmp_path / "out", version=version)
    assert str(info.value).startswith(f"{versioned_table}: version {version!r} does not exist (versions 0..1)")
    assert not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# Refusals: corrupt tables
# --------------------------------------------------------------------------------------------


def test_missing_chunk(spark: Any, fresh_table: str, models: tuple[Path, Path], tmp_path: Path) -> None:
    """A missing chunk is named with table, version, chunk and file; the earlier version still loads."""

    def drop_chunk(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        victim = file_row(rows, "weights.bin", 2)
        return [r for r in rows if r is not victim]

    rewrite(spark, fresh_table, drop_chunk)
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: chunk 2 of 'weights.bin' is missing \(4 expected\); re-save"):
        load_model(spark, fresh_table, tmp_path / "out")
    load_model(spark, fresh_table, tmp_path / "v0", version=0)
    assert snapshot(tmp_path / "v0") == snapshot(models[0])


def test_checksum_mismatch(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A chunk whose bytes were altered fails its sha256 check, naming table, version, chunk and file."""

    def tamper(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        row = file_row(rows, "variables/deeper/leaf.data", 0)
        data = bytearray(row["data"])
        data[10] ^= 0xFF
        row["data"] = bytes(data)
        return rows

    rewrite(spark, fresh_table, tamper)
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: chunk 0 of 'variables/deeper/leaf.data' fails its sha256 check"):
        read_model(spark, fresh_table, sink=lambda p, i, d: None)


def test_consistent_tampering_is_caught_on_load(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A chunk altered together with its chunk sha256 still fails the whole-file check on load."""

    def tamper(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        row = file_row(rows, "weights.bin", 1)
        row["data"] = b"\x00" * len(row["data"])
        row["chunk_sha256"] = hashlib.sha256(row["data"]).hexdigest()
        return rows

    rewrite(spark, fresh_table, tamper)
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: file 'weights.bin' fails its check after loading .*sha256 mismatch"):
        load_model(spark, fresh_table, tmp_path / "out")


@pytest.mark.parametrize(
    ("bad_path", "why"),
    [("/etc/passwd", "is absolute"), ("../escape.txt", r"escapes the model folder \('..'\)")],
)
def test_unsafe_path_row(spark: Any, fresh_table: str, tmp_path: Path, bad_path: str, why: str) -> None:
    """A file row whose path is absolute or climbs out of the folder is refused before anything is written."""

    def move(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        file_row(rows, "config.json", 0)["path"] = bad_path
        return rows

    rewrite(spark, fresh_table, move)
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: stored path '{bad_path}' {why}"):
        load_model(spark, fresh_table, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_unsafe_folder_in_manifest(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A manifest folder entry that escapes the model folder is refused."""

    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        manifest = next(r for r in rows if r["kind"] == "manifest")
        doc = json.loads(manifest["data"])
        doc["dirs"].append("../outside")
        manifest["data"] = json.dumps(doc).encode()
        return rows

    rewrite(spark, fresh_table, edit)
    with pytest.raises(ModelTableError, match=r"stored path '../outside' escapes"):
        load_model(spark, fresh_table, tmp_path / "out")
    assert not (tmp_path / "outside").exists()


def test_chunk_index_out_of_range(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """An extra chunk row past the file's chunk count is refused, naming the chunk and the file."""

    def add_chunk(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        extra = dict(file_row(rows, "weights.bin", 3), chunk_index=4)
        return [*rows, extra]

    rewrite(spark, fresh_table, add_chunk)
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: chunk 4 of 'weights.bin' is out of range \(the file has 4 chunks\)"):
        read_model(spark, fresh_table, sink=lambda p, i, d: None)


def test_table_without_manifest_row(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A table whose manifest row is gone is refused as incomplete."""
    rewrite(spark, fresh_table, lambda rows: [r for r in rows if r["kind"] != "manifest"])
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: no manifest row"):
        load_model(spark, fresh_table, tmp_path / "out")


def test_empty_model_table(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A model table version with no rows is refused as empty."""
    rewrite(spark, fresh_table, lambda rows: [])
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v1: the table is empty"):
        load_model(spark, fresh_table, tmp_path / "out")


def test_non_model_table(spark: Any, tmp_path: Path) -> None:
    """A Delta table with other columns is refused naming the missing columns."""
    table = str(tmp_path / "other")
    spark.createDataFrame([(1, "a")], "id int, path string").write.format("delta").save(table)
    with pytest.raises(ModelTableError) as info:
        load_model(spark, table, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"{table}@v0: not a model table")
    assert "'chunk_index'" in msg and "'data'" in msg and "'path'" not in msg.split("it has")[0]
    assert isinstance(info.value, SparkRayUdfError) and isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# save_model refusals
# --------------------------------------------------------------------------------------------


def test_save_missing_folder(spark: Any, tmp_path: Path) -> None:
    """save_model on a folder that does not exist raises ModelNotFoundError naming it."""
    missing = tmp_path / "no_model"
    with pytest.raises(ModelNotFoundError, match=rf"^{missing}: not a folder"):
        save_model(spark, missing, str(tmp_path / "t"))


def test_save_file_instead_of_folder(spark: Any, tmp_path: Path) -> None:
    """save_model on a single file is refused: it stores folders."""
    f = tmp_path / "model.keras"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        save_model(spark, f, str(tmp_path / "t"))


@pytest.mark.parametrize("with_subfolder", [False, True])
def test_save_empty_folder(spark: Any, tmp_path: Path, with_subfolder: bool) -> None:
    """A folder without files (even with empty subfolders) is refused and no table is created."""
    src = tmp_path / "empty_model"
    (src / "sub" if with_subfolder else src).mkdir(parents=True)
    table = str(tmp_path / "t")
    with pytest.raises(ModelTableError, match="holds no files; nothing to save"):
        save_model(spark, src, table)
    assert not Path(table).exists()


def test_save_refuses_symlink_loop(spark: Any, tmp_path: Path) -> None:
    """A symbolic link back to an enclosing folder is refused before anything is written."""
    src = tmp_path / "looped"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.bin").write_bytes(b"x")
    (src / "sub" / "back").symlink_to(src, target_is_directory=True)
    table = str(tmp_path / "t")
    with pytest.raises(ModelTableError, match=r"the folder 'sub/back' links back to an enclosing folder"):
        save_model(spark, src, table)
    assert not Path(table).exists()


def test_walk_follows_symlinked_folders_and_files(tmp_path: Path) -> None:
    """With follow_symlinks=True, files inside a folder linked from outside, and files linked
    from outside, are part of the model (by default such links are refused:
    tests/test_hostile_tables.py)."""
    outside = tmp_path / "shared"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "w.bin").write_bytes(b"w")
    (tmp_path / "blob").write_bytes(b"b")
    src = tmp_path / "model"
    src.mkdir()
    (src / "linked").symlink_to(outside, target_is_directory=True)
    (src / "file.bin").symlink_to(tmp_path / "blob")
    files, dirs = _walk(src, follow_symlinks=True)
    assert files == ["file.bin", "linked/inner/w.bin"]
    assert dirs == ["linked", "linked/inner"]


@pytest.mark.parametrize(("option", "value"), [("chunk_size", 0), ("chunk_size", 513 * 1024 * 1024), ("mode", "append")])
def test_save_bad_options(spark: Any, models: tuple[Path, Path], tmp_path: Path, option: str, value: Any) -> None:
    """Out-of-range chunk_size and unknown modes are refused before anything is written."""
    with pytest.raises(ValueError, match=rf"{option} must be"):
        save_model(spark, models[0], str(tmp_path / "t"), **{option: value})
    assert not (tmp_path / "t").exists()


def test_mode_error_on_existing_path_table(spark: Any, versioned_table: str, models: tuple[Path, Path]) -> None:
    """mode='error' refuses an existing path table and commits nothing."""
    with pytest.raises(ModelTableError, match=rf"^{versioned_table}: the table already exists and mode='error'"):
        save_model(spark, models[0], versioned_table, mode="error", chunk_size=CHUNK)
    assert latest_version(spark, versioned_table) == 1


def test_mode_error_on_new_then_existing_metastore_table(spark: Any, models: tuple[Path, Path]) -> None:
    """mode='error' writes a new db.table once, then refuses it."""
    table = f"{DB}.once"
    assert save_model(spark, models[1], table, mode="error", chunk_size=CHUNK) == 0
    with pytest.raises(ModelTableError, match=rf"^{table}: the table already exists"):
        save_model(spark, models[0], table, mode="error", chunk_size=CHUNK)
    assert latest_version(spark, table) == 0


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["a", ".hidden", "..hidden", "a/b/c.txt", "variables/variables.data-00000-of-00001"])
def test_check_relative_path_accepts(path: str) -> None:
    """Normal relative paths, dotfiles included, are accepted unchanged."""
    assert check_relative_path(path, where="t@v0") == path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "is empty or holds a NUL byte"),
        ("a\x00b", "is empty or holds a NUL byte"),
        ("/etc/passwd", "is absolute"),
        ("C:/model", "is absolute"),
        ("a\\b", "is absolute"),
        ("..", "escapes the model folder"),
        ("../x", "escapes the model folder"),
        ("a/../../x", "escapes the model folder"),
        ("a/../b", "escapes the model folder"),
        ("a/./b", "is not normalized"),
        ("a//b", "is not normalized"),
        ("a/", "is not normalized"),
        (".", "is not normalized"),
    ],
)
def test_check_relative_path_refuses(path: str, why: str) -> None:
    """Empty, absolute, escaping and non-normalized paths raise ModelTableError naming table@version and path."""
    with pytest.raises(ModelTableError) as info:
        check_relative_path(path, where="db.t@v3")
    msg = str(info.value)
    assert msg.startswith(f"db.t@v3: stored path {path!r} {why}")
    assert "re-save the model" in msg


@pytest.mark.parametrize(
    ("name", "is_path"),
    [("db.tbl", False), ("tbl", False), ("/data/models/m", True), ("s3a://bucket/m", True), ("./m", True), ("rel/m", True)],
)
def test_table_ref_is_path(name: str, is_path: bool) -> None:
    """Names with a slash, a scheme or a leading dot are paths; others are metastore names."""
    assert TableRef(name).is_path is is_path


def test_manifest_json_round_trip() -> None:
    """A manifest survives to_json / from_json unchanged."""
    m = Manifest(files=(ModelFile("a/b", 3, "ab" * 32, 1),), dirs=("a", "e"), chunk_size=7, created="now", source="m")
    assert Manifest.from_json(m.to_json(), where="t@v0") == m


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "the manifest row is unreadable"),
        (b'{"format": "other/1", "files": []}', "the manifest row is unreadable"),
        (b'{"format": "spark-ray-udf/1"}', "the manifest's field 'chunk_size' must be an integer"),
    ],
)
def test_unreadable_manifest(body: bytes, message: str) -> None:
    """A manifest that is not JSON, of another format or incomplete raises ModelTableError naming
    the table (and the field; more cases in tests/test_hostile_tables.py)."""
    with pytest.raises(ModelTableError, match=rf"^t@v2: {message}"):
        Manifest.from_json(body, where="t@v2")


def test_materialize_refuses_wrong_size(tmp_path: Path) -> None:
    """materialize checks each file's size and sha256 after writing it."""
    good = b"hello"
    m = Manifest(files=(ModelFile("f.txt", len(good), hashlib.sha256(good).hexdigest(), 1),), dirs=(), chunk_size=10)
    (tmp_path / "ok").mkdir()
    materialize(m, lambda p, i: good, tmp_path / "ok", where="t@v0")
    assert (tmp_path / "ok" / "f.txt").read_bytes() == good
    (tmp_path / "bad").mkdir()
    with pytest.raises(ModelTableError, match=r"t@v0: chunk 0 of 'f.txt' holds 4 bytes, but the manifest's file size 5 and chunk size 10 make it 5"):
        materialize(m, lambda p, i: b"hell", tmp_path / "bad", where="t@v0")
    (tmp_path / "worse").mkdir()
    with pytest.raises(ModelTableError, match=r"t@v0: file 'f.txt' fails its check after loading \(size 5, expected 5; sha256 mismatch"):
        materialize(m, lambda p, i: b"jello", tmp_path / "worse", where="t@v0")


# --- reading a version's Parquet files directly (pyarrow) or through Spark ----------------------


def test_locate_model_finds_files_and_manifest_without_reading_chunks(spark: Any, versioned_table: str) -> None:
    """A plain Delta table is read directly: its version's files and the manifest row, which
    equals the one read_model checks against every chunk."""
    from spark_ray_udf.store import locate_model

    for version in (0, 1):
        located = locate_model(spark, versioned_table, version)
        assert located is not None and located.files and located.chunks == {}
        assert all(f.startswith("file:") and f.endswith(".parquet") for f in located.files)
        full = read_model(spark, versioned_table, version=version, sink=lambda p, i, d: None)
        assert located.manifest == full.manifest


def test_write_model_takes_rows_in_any_order(spark: Any, versioned_table: str, models: tuple[Path, Path], tmp_path: Path) -> None:
    """Chunks are written at their offsets, so any row order rebuilds the folder byte for byte."""
    import random

    from spark_ray_udf.store import locate_model, rows_from_files, write_model as write_rows

    located = locate_model(spark, versioned_table, 1)
    assert located is not None
    rows = list(rows_from_files(located.files, where="t@v1"))
    assert sum(r.kind == "file" for r in rows) > len(located.manifest.files)  # multi-chunk files
    for seed in range(3):
        random.Random(seed).shuffle(rows)
        dest = tmp_path / f"out{seed}"
        dest.mkdir()
        assert write_rows(iter(rows), dest, where="t@v1") == located.manifest
        assert snapshot(dest) == snapshot(models[1])


def test_write_model_refuses_a_truncated_chunk(spark: Any, versioned_table: str, tmp_path: Path) -> None:
    """A chunk whose bytes (and chunk sha256) were cut short is refused at its row: its length
    is not what the manifest's file size and chunk size make it (before, it left a file with a
    hole that only the whole-file check caught)."""
    from spark_ray_udf.store import ChunkRow, locate_model, rows_from_files, write_model as write_rows

    located = locate_model(spark, versioned_table, 1)
    assert located is not None
    rows = []
    for r in rows_from_files(located.files, where="t@v1"):
        if r.path == "weights.bin" and r.chunk_index == 0:
            short = r.data[:-10]
            r = ChunkRow(**{**r._asdict(), "data": short, "chunk_sha256": hashlib.sha256(short).hexdigest()})
        rows.append(r)
    with pytest.raises(ModelTableError, match=r"^t@v1: chunk 0 of 'weights.bin' holds 990 bytes, but the manifest's file size 2100 and chunk size 1000 make it 1000 \(field 'data'\)"):
        write_rows(iter(rows), tmp_path, where="t@v1")


def test_latest_version_from_the_log_equals_delta_history(spark: Any, models: tuple[Path, Path], tmp_path: Path) -> None:
    """The folder listing of _delta_log and Delta's own history agree, for path and metastore
    tables, across several commits (including a checkpoint at version 10)."""
    from delta.tables import DeltaTable

    from spark_ray_udf import _delta
    from spark_ray_udf.store import locate_model

    table = str(tmp_path / "many")
    name = f"{DB}.many_versions"
    for i in range(12):
        save_model(spark, models[i % 2], table, chunk_size=CHUNK)
    save_model(spark, models[0], name, chunk_size=CHUNK)
    save_model(spark, models[1], name, chunk_size=CHUNK)
    assert any(p.name.endswith(".checkpoint.parquet") for p in (tmp_path / "many" / "_delta_log").iterdir())
    assert _delta.latest_from_log(table) == 11 == latest_version(spark, table)
    history = DeltaTable.forPath(spark, table).history(1).head()
    assert history is not None and history.version == 11
    locate_model(spark, name, 0)  # learns the metastore table's location
    info = _delta.cached_info(name)
    assert info is not None and info.direct
    assert _delta.latest_from_log(info.location) == 1 == latest_version(spark, name)
    located = locate_model(spark, table, 7)
    assert located is not None
    dest = tmp_path / "v7"
    load_model(spark, table, dest, version=7)
    assert snapshot(dest) == snapshot(models[1])


def test_deletion_vectors_are_read_through_spark(spark: Any, fresh_table: str, models: tuple[Path, Path], tmp_path: Path) -> None:
    """With deletion vectors the Parquet files still hold deleted rows: such a table is read
    through Spark, which honours the delete (here: a chunk row deleted -> 'missing')."""
    from spark_ray_udf.store import locate_model

    spark.sql(f"ALTER TABLE delta.`{fresh_table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    v = latest_version(spark, fresh_table)
    assert locate_model(spark, fresh_table, v) is None
    ok = tmp_path / "ok"
    load_model(spark, fresh_table, ok)
    assert snapshot(ok) == snapshot(models[0])
    spark.sql(f"DELETE FROM delta.`{fresh_table}` WHERE path = 'weights.bin' AND chunk_index = 1")
    assert locate_model(spark, fresh_table, v + 1) is None
    with pytest.raises(ModelTableError, match=rf"^{fresh_table}@v{v + 1}: chunk 1 of 'weights.bin' is missing"):
        load_model(spark, fresh_table, tmp_path / "bad")
    assert not any((tmp_path / "bad").iterdir())


def test_vacuumed_data_file_is_named(spark: Any, fresh_table: str, tmp_path: Path) -> None:
    """A version whose Parquet file is gone gets ModelNotFoundError naming the file."""
    from spark_ray_udf.store import locate_model, rows_from_files

    located = locate_model(spark, fresh_table, 0)
    assert located is not None
    gone = located.files[0]
    os.remove(gone.removeprefix("file:"))
    with pytest.raises(ModelNotFoundError, match=r"its data file .* is gone"):
        list(rows_from_files(located.files, where=f"{fresh_table}@v0"))


def test_one_gigabyte_model_round_trip_with_the_default_heap(spark: Any, tmp_path: Path) -> None:
    """A 1 GiB file (256 chunks of 4 MiB) saves and loads with the test session's 2 GB driver
    heap: one chunk per Parquet page on write, pyarrow page by page on read (the same model
    overflowed the heap on both sides before)."""
    from spark_ray_udf.store import _sha256_file

    src = tmp_path / "big"
    src.mkdir()
    with open(src / "table.bin", "wb") as fh:
        for _ in range(256):
            fh.write(os.urandom(4 << 20))
    digest = _sha256_file(src / "table.bin")
    table = str(tmp_path / "big_table")
    try:
        version = save_model(spark, src, table)
        shutil.rmtree(src)
        stored = load_model(spark, table, tmp_path / "out")
        assert stored.version == version and stored.manifest.files[0].num_chunks == 256
        assert (tmp_path / "out" / "table.bin").stat().st_size == 1 << 30
        assert _sha256_file(tmp_path / "out" / "table.bin") == digest
    finally:
        for p in (src, tmp_path / "out", Path(table)):
            shutil.rmtree(p, ignore_errors=True)
