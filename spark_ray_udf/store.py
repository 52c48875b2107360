"""A model directory <-> rows of a Delta table.

Every file of the model directory becomes rows of ``(path, chunk_index, bytes)`` with the file's
size and sha256 and each chunk's sha256, plus one manifest row that lists every file and folder.
Each :func:`save_model` is one Delta commit, so every version of the table is one whole model and
earlier versions stay readable by number (Delta time travel).

Table layout (one row per chunk, one manifest row)::

    kind          string   'manifest' or 'file'
    path          string   path relative to the model folder, '/'-separated ('' for the manifest)
    chunk_index   int      0, 1, ... within the file
    num_chunks    int      chunks of the file
    file_size     bigint   bytes of the whole file
    file_sha256   string   hex sha256 of the whole file
    chunk_sha256  string   hex sha256 of this chunk
    data          binary   the chunk (at most ``chunk_size`` bytes); the manifest JSON

Memory: saving streams one chunk at a time through a staging Parquet file, so the driver holds
one chunk (4 MiB by default), and Spark writes one chunk per Parquet page (a 1 GB model saves
with Spark's default 2 GB driver heap). Loading reads the version's Parquet files with pyarrow,
page by page (about 50 MB of buffers for any model size, no JVM), when the table's files are its
rows (no deletion vectors or column mapping, see :mod:`spark_ray_udf._delta`); otherwise it
streams the table partition by partition (``DataFrame.toLocalIterator``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

from spark_ray_udf import _delta
from spark_ray_udf.errors import ModelNotFoundError, ModelTableError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

FORMAT = "spark-ray-udf/1"
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
COLUMNS = (
    "kind",
    "path",
    "chunk_index",
    "num_chunks",
    "file_size",
    "file_sha256",
    "chunk_sha256",
    "data",
)
SaveMode = Literal["overwrite", "error"]
T = TypeVar("T")


@dataclass(frozen=True)
class ModelFile:
    """One file of a stored model, as listed in the manifest."""

    path: str
    size: int
    sha256: str
    num_chunks: int


@dataclass(frozen=True)
class Manifest:
    """What a stored model holds: its files, its (possibly empty) folders, the chunk size."""

    files: tuple[ModelFile, ...]
    dirs: tuple[str, ...]
    chunk_size: int
    created: str = ""
    source: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "files": [f.__dict__ for f in self.files],
                "dirs": list(self.dirs),
                "chunk_size": self.chunk_size,
                "created": self.created,
                "source": self.source,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        try:
            doc = json.loads(bytes(data))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            files = tuple(ModelFile(**f) for f in doc["files"])
            return cls(
                files=files,
                dirs=tuple(doc.get("dirs", ())),
                chunk_size=int(doc["chunk_size"]),
                created=str(doc.get("created", "")),
                source=str(doc.get("source", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelTableError(
                f"{where}: the manifest row is unreadable ({exc}); re-save the model with save_model()"
            ) from exc


@dataclass(frozen=True)
class TableRef:
    """A model table: a metastore name (``db.table``) or a path to a Delta table."""

    name: str

    @property
    def is_path(self) -> bool:
        n = self.name
        return "/" in n or "\\" in n or ":" in n or n.startswith(".")

    def __str__(self) -> str:
        return self.name


@dataclass
class StoredModel(Generic[T]):
    """A model read from a table version: the manifest and each chunk as given by the sink."""

    table: str
    version: int
    manifest: Manifest
    chunks: dict[tuple[str, int], T] = field(repr=False)
    files: tuple[str, ...] = ()  # the version's Parquet files, when readable directly

    @property
    def where(self) -> str:
        return f"{self.table}@v{self.version}"


def check_relative_path(path: str, *, where: str) -> str:
    """Refuse a stored path that is absolute, empty, or escapes the model folder.

    >>> check_relative_path("variables/variables.index", where="t@v0")
    'variables/variables.index'
    >>> check_relative_path("../etc/passwd", where="t@v0")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ModelTableError: t@v0: stored path '../etc/passwd' escapes the model folder ('..'); the table is corrupt or was not written by save_model(): re-save the model
    """
    fix = "the table is corrupt or was not written by save_model(): re-save the model"
    if not path or "\x00" in path:
        raise ModelTableError(f"{where}: stored path {path!r} is empty or holds a NUL byte; {fix}")
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise ModelTableError(f"{where}: stored path {path!r} is absolute; {fix}")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise ModelTableError(f"{where}: stored path {path!r} escapes the model folder ('..'); {fix}")
    if any(p in ("", ".") for p in path.split("/")):
        raise ModelTableError(f"{where}: stored path {path!r} is not normalized; {fix}")
    return path


def _walk(model_dir: Path) -> tuple[list[str], list[str]]:
    # Symbolic links are followed: a linked folder is stored with its files, as a linked file is
    # stored with its bytes. A link back to an enclosing folder (a loop) is refused.
    files: list[str] = []
    dirs: list[str] = []
    for root, dirnames, filenames in os.walk(model_dir, followlinks=True):
        dirnames.sort()
        rel_root = Path(root).relative_to(model_dir)
        if rel_root.parts:
            real = os.path.realpath(root)
            for k in range(len(rel_root.parts)):
                if os.path.realpath(model_dir.joinpath(*rel_root.parts[:k])) == real:
                    raise ModelTableError(
                        f"{model_dir}: the folder '{rel_root.as_posix()}' links back to an "
                        "enclosing folder (a symbolic link loop); remove the link, then save again"
                    )
        for d in dirnames:
            dirs.append((rel_root / d).as_posix())
        for f in sorted(filenames):
            files.append((rel_root / f).as_posix())
    return files, dirs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_staging(model_dir: Path, staging_file: Path, chunk_size: int) -> Manifest:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("kind", pa.string()),
            ("path", pa.string()),
            ("chunk_index", pa.int32()),
            ("num_chunks", pa.int32()),
            ("file_size", pa.int64()),
            ("file_sha256", pa.string()),
            ("chunk_sha256", pa.string()),
            ("data", pa.binary()),
        ]
    )
    files, dirs = _walk(model_dir)
    if not files:
        raise ModelTableError(f"{model_dir}: the model folder holds no files; nothing to save")
    entries: list[ModelFile] = []

    def row(**kw: Any) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([kw], schema=schema)

    with pq.ParquetWriter(staging_file, schema, compression="none") as writer:
        for rel in files:
            full = model_dir / rel
            size = full.stat().st_size
            digest = _sha256_file(full)
            num_chunks = max(1, -(-size // chunk_size))
            with open(full, "rb") as fh:
                for idx in range(num_chunks):
                    chunk = fh.read(chunk_size)
                    writer.write_batch(
                        row(
                            kind="file",
                            path=rel,
                            chunk_index=idx,
                            num_chunks=num_chunks,
                            file_size=size,
                            file_sha256=digest,
                            chunk_sha256=hashlib.sha256(chunk).hexdigest(),
                            data=chunk,
                        )
                    )
            if _sha256_file(full) != digest:
                raise ModelTableError(f"{full}: the file changed while it was being saved; save again")
            entries.append(ModelFile(rel, size, digest, num_chunks))
        manifest = Manifest(
            files=tuple(entries),
            dirs=tuple(dirs),
            chunk_size=chunk_size,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source=model_dir.name,
        )
        body = manifest.to_json()
        writer.write_batch(
            row(
                kind="manifest",
                path="",
                chunk_index=0,
                num_chunks=1,
                file_size=len(body),
                file_sha256=hashlib.sha256(body).hexdigest(),
                chunk_sha256=hashlib.sha256(body).hexdigest(),
                data=body,
            )
        )
    return manifest


def save_model(
    spark: SparkSession,
    model_dir: str | os.PathLike[str],
    table: str,
    *,
    mode: SaveMode = "overwrite",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    staging_dir: str | None = None,
) -> int:
    """Store every file of ``model_dir`` in the Delta table ``table`` and return the new version.

    ``table`` is a metastore name (``db.table``; the database is created if missing) or a path.
    ``mode="overwrite"`` commits a new version and keeps the earlier ones readable by number;
    ``mode="error"`` refuses to write into an existing table (:class:`ModelTableError`). Symbolic
    links inside ``model_dir`` are followed (a link loop is refused). The files go through a
    staging Parquet file in ``staging_dir`` (a temporary folder by default; on a cluster, pass a
    folder the executors can read), one chunk at a time.

    Example (``spark`` is a Delta-enabled session, see :mod:`spark_ray_udf.testing`)::

        version = save_model(spark, "/tmp/mnist_model", "ai_model.mnist_model")
    """
    src = Path(model_dir)
    if not src.is_dir():
        raise ModelNotFoundError(f"{src}: not a folder; save_model() stores a model folder")
    if chunk_size <= 0 or chunk_size > 512 * 1024 * 1024:
        raise ValueError(f"chunk_size must be in 1..512 MiB (got {chunk_size!r})")
    if mode not in ("overwrite", "error"):
        raise ValueError(f"mode must be 'overwrite' or 'error' (got {mode!r})")
    ref = TableRef(table)
    if mode == "error" and _table_exists(spark, ref):
        raise ModelTableError(
            f"{table}: the table already exists and mode='error'; pass mode='overwrite' to "
            "commit the model as a new version (earlier versions stay readable), or pick "
            "another table"
        )
    staging_root = Path(tempfile.mkdtemp(prefix="spark-ray-udf-save-", dir=staging_dir))
    try:
        staging_file = staging_root / "model.parquet"
        manifest = _write_staging(src, staging_file, chunk_size)
        df = spark.read.parquet(str(staging_root))
        writer = df.write.format("delta").mode("overwrite" if mode == "overwrite" else "errorifexists")
        if not ref.is_path and "." in ref.name:
            spark.sql(f"CREATE DATABASE IF NOT EXISTS {ref.name.rsplit('.', 1)[0]}")
        with _page_per_row(spark):
            writer.save(ref.name) if ref.is_path else writer.saveAsTable(ref.name)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    version = latest_version(spark, table)
    log.info(
        "saved %s (%d files, %d bytes) as %s@v%d",
        src,
        len(manifest.files),
        manifest.total_bytes,
        table,
        version,
    )
    return version


# Parquet checks a page's size only every 100 values by default: 100 chunks of 4 MiB make a
# 400 MiB page, compressed into a growing byte array, which overflows Spark's default 2 GB
# driver heap for a ~1 GB model. Delta drops writer options but copies session SQL confs into
# the write's Hadoop conf, so these are set on the session for the duration of the write.
_PAGE_PER_ROW = {"parquet.page.size.row.check.min": "1", "parquet.page.size.row.check.max": "1"}


@contextmanager
def _page_per_row(spark: SparkSession) -> Iterator[None]:
    saved: dict[str, str | None] = {k: spark.conf.get(k, None) for k in _PAGE_PER_ROW}
    for k, v in _PAGE_PER_ROW.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def _table_exists(spark: SparkSession, ref: TableRef) -> bool:
    if ref.is_path:
        from delta.tables import DeltaTable

        return bool(DeltaTable.isDeltaTable(spark, ref.name))
    return bool(spark.catalog.tableExists(ref.name))


def _delta_table(spark: SparkSession, table: str) -> Any:
    from delta.tables import DeltaTable

    ref = TableRef(table)
    if ref.is_path:
        if not DeltaTable.isDeltaTable(spark, ref.name):
            raise ModelNotFoundError(
                f"{table}: no Delta table at this path; save a model there with save_model() "
                "or check the path"
            )
        return DeltaTable.forPath(spark, ref.name)
    if not spark.catalog.tableExists(ref.name):
        raise ModelNotFoundError(
            f"{table}: no such table in the metastore; save a model with save_model() or pass "
            "the table's path"
        )
    try:
        return DeltaTable.forName(spark, ref.name)
    except Exception as exc:  # AnalysisException: not a Delta table
        raise ModelTableError(f"{table}: not a Delta table ({exc}); save_model() writes Delta") from exc


def latest_version(spark: SparkSession, table: str) -> int:
    """The newest committed version of the Delta table ``table``.

    For a table whose commits are files in its ``_delta_log`` folder (a path table, or a
    metastore table whose location was looked up before), this is one folder listing (~1 ms);
    otherwise it asks Delta's history (~100 ms, a Spark query).
    """
    ref = TableRef(table)
    info = _delta.cached_info(table)
    if info is None and not ref.is_path:
        # DESCRIBE DETAIL is plain SQL, so this also works over Spark Connect, where Delta's
        # DeltaTable API below needs Delta's Connect server plugin; errors: the Spark path below
        try:
            info = _delta.table_info(spark, table, is_path=False)
        except Exception as exc:  # AnalysisException for a missing table: reported below
            log.debug("%s: DESCRIBE DETAIL failed (%s); asking Delta's history", table, exc)
    location = ref.name if ref.is_path else (info.location if info is not None else None)
    if location is not None and (info is None or info.direct):
        try:
            found = _delta.latest_from_log(location)
        except (OSError, ValueError, NotImplementedError) as exc:
            log.debug("%s: listing the Delta log failed (%s); asking Spark", table, exc)
            _delta.forget(table)
            found = None
        if found is not None:
            return found
    row = _delta_table(spark, table).history(1).select("version").head()
    if row is None:
        raise ModelTableError(f"{table}: the Delta table has no history; re-save the model")
    return int(row[0])


def resolve_version(spark: SparkSession, table: str, version: int | None) -> int:
    """``version`` checked against the table's history, or the latest version when None."""
    latest = latest_version(spark, table)
    if version is None:
        return latest
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= latest:
        raise ModelNotFoundError(
            f"{table}: version {version!r} does not exist (versions 0..{latest}); pass version=None "
            "for the latest"
        )
    return version


def _read_version(spark: SparkSession, table: str, version: int) -> DataFrame:
    ref = TableRef(table)
    reader = spark.read.format("delta").option("versionAsOf", version)
    try:
        return reader.load(ref.name) if ref.is_path else reader.table(ref.name)
    except Exception as exc:  # AnalysisException: vacuumed or unreadable version
        raise ModelNotFoundError(f"{table}@v{version}: cannot read this version ({exc})") from exc


class ChunkRow(NamedTuple):
    """One row of a model table."""

    kind: str
    path: str
    chunk_index: int
    num_chunks: int
    file_size: int
    file_sha256: str
    chunk_sha256: str
    data: bytes


def _not_model_table(
    where: str, missing: list[str], has: list[str], uri: str = ""
) -> ModelTableError:
    in_file = f" in {uri}" if uri else ""
    return ModelTableError(
        f"{where}: not a model table (columns {missing} are missing{in_file}; it has {has}); "
        "model tables are written by save_model()"
    )


def _spark_rows(df: DataFrame, where: str) -> Iterator[ChunkRow]:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise _not_model_table(where, missing, df.columns)
    for r in df.select(*COLUMNS).toLocalIterator(prefetchPartitions=False):
        yield ChunkRow(
            kind=r.kind,
            path=r.path,
            chunk_index=r.chunk_index,
            num_chunks=r.num_chunks,
            file_size=r.file_size,
            file_sha256=r.file_sha256,
            chunk_sha256=r.chunk_sha256,
            data=bytes(r.data) if r.data is not None else b"",
        )


def rows_from_files(files: Sequence[str], *, where: str) -> Iterator[ChunkRow]:
    """Stream the rows of a table version's Parquet files with pyarrow, a few chunks at a time.

    Holds about one Parquet page plus four chunks in memory, however large the model; no JVM
    is involved. ``files`` come from :func:`locate_model`.
    """
    for uri in files:
        with _open_parquet(uri, where=where) as pf:
            for batch in pf.iter_batches(batch_size=4, columns=list(COLUMNS)):
                for r in batch.to_pylist():
                    r["data"] = r["data"] if r["data"] is not None else b""
                    yield ChunkRow(**r)


@contextmanager
def _open_parquet(uri: str, *, where: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    fs, path = _delta.open_uri(uri)
    try:
        fh = fs.open_input_file(path)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(
            f"{where}: its data file {uri} is gone (removed by VACUUM, or the table moved); "
            "register the latest version, or save the model again"
        ) from exc
    with fh:
        pf = pq.ParquetFile(fh, buffer_size=1 << 20, pre_buffer=False)  # stream page by page
        names = pf.schema_arrow.names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise _not_model_table(where, missing, names, uri)
        yield pf


def _collect(
    rows: Iterator[ChunkRow], where: str, keep: Callable[[ChunkRow, str], T]
) -> tuple[Manifest, dict[tuple[str, int], T]]:
    """Check every row of a model version against the manifest; ``keep(row, path)`` each chunk.

    Every chunk's sha256, every path, and the chunk set of every file are checked; any gap
    raises :class:`ModelTableError` naming the table, version and file.
    """
    manifest: Manifest | None = None
    chunks: dict[tuple[str, int], T] = {}
    seen: dict[str, tuple[int, int, str]] = {}
    n_rows = 0
    for r in rows:
        n_rows += 1
        if r.kind == "manifest":
            if manifest is not None:
                raise ModelTableError(f"{where}: two manifest rows; re-save the model")
            manifest = Manifest.from_json(r.data, where=where)
            continue
        if r.kind != "file":
            raise ModelTableError(f"{where}: row of unknown kind {r.kind!r}; re-save the model")
        path = check_relative_path(r.path, where=where)
        if hashlib.sha256(r.data).hexdigest() != r.chunk_sha256:
            raise ModelTableError(
                f"{where}: chunk {r.chunk_index} of {path!r} fails its sha256 check; the table "
                "was modified or corrupted: re-save the model with save_model()"
            )
        key = (path, int(r.chunk_index))
        if not 0 <= key[1] < int(r.num_chunks):
            raise ModelTableError(
                f"{where}: chunk {r.chunk_index} of {path!r} is out of range (the file has "
                f"{r.num_chunks} chunks); re-save the model with save_model()"
            )
        if key in chunks:
            raise ModelTableError(f"{where}: chunk {r.chunk_index} of {path!r} appears twice")
        facts = (int(r.num_chunks), int(r.file_size), str(r.file_sha256))
        if seen.setdefault(path, facts) != facts:
            raise ModelTableError(f"{where}: the rows of {path!r} disagree on its size or sha256")
        chunks[key] = keep(r, path)
    if n_rows == 0:
        raise ModelTableError(f"{where}: the table is empty; save a model with save_model()")
    if manifest is None:
        raise ModelTableError(
            f"{where}: no manifest row; this table was not written by save_model() or is incomplete"
        )
    listed = {f.path for f in manifest.files}
    extra = sorted(set(seen) - listed)
    if extra:
        raise ModelTableError(f"{where}: files {extra} are not in the manifest; re-save the model")
    for f in manifest.files:
        check_relative_path(f.path, where=where)
        for idx in range(f.num_chunks):
            if (f.path, idx) not in chunks:
                raise ModelTableError(
                    f"{where}: chunk {idx} of {f.path!r} is missing ({f.num_chunks} expected); "
                    "re-save the model with save_model()"
                )
        if f.path in seen and seen[f.path] != (f.num_chunks, f.size, f.sha256):
            raise ModelTableError(f"{where}: rows of {f.path!r} disagree with the manifest")
    for d in manifest.dirs:
        check_relative_path(d, where=where)
    return manifest, chunks


def locate_model(spark: SparkSession, table: str, version: int) -> StoredModel[Any] | None:
    """The manifest and Parquet files of ``table@version`` when pyarrow can read them directly
    (see :mod:`spark_ray_udf._delta`), else None. Reads the manifest row only: no model bytes.
    """
    ref = TableRef(table)
    where = f"{table}@v{version}"
    try:
        info = _delta.table_info(spark, table, is_path=ref.is_path)
    except Exception as exc:  # AnalysisException and friends: the Spark path reports them
        log.info("%s: DESCRIBE DETAIL failed (%s); reading through Spark", where, exc)
        return None
    if not info.direct:
        log.info("%s: table features %s: reading through Spark", where, sorted(info.features))
        return None
    files = sorted(_read_version(spark, table, version).inputFiles())
    if not files:
        raise ModelTableError(f"{where}: the table is empty; save a model with save_model()")
    try:
        fs, path = _delta.open_uri(files[0])
        readable = fs.get_file_info(path).is_file
    except (OSError, ValueError, NotImplementedError) as exc:
        log.info("%s: pyarrow cannot open %s (%s); reading through Spark", where, files[0], exc)
        return None
    if not readable:
        log.info("%s: pyarrow does not see %s; reading through Spark", where, files[0])
        return None
    manifest = _find_manifest(files, where)
    return StoredModel(table=table, version=version, manifest=manifest, chunks={}, files=tuple(files))


def _find_manifest(files: Sequence[str], where: str) -> Manifest:
    # Row-group statistics of `kind` skip the groups that hold only file chunks.
    for uri in files:
        with _open_parquet(uri, where=where) as pf:
            kind_col = pf.schema_arrow.get_field_index("kind")
            for g in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(g).column(kind_col).statistics
                if stats is not None and stats.has_min_max and not (
                    stats.min <= "manifest" <= stats.max
                ):
                    continue
                for batch in pf.iter_batches(batch_size=4, row_groups=[g], columns=["kind", "data"]):
                    for kind, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        if kind == "manifest":
                            return Manifest.from_json(data or b"", where=where)
    raise ModelTableError(
        f"{where}: no manifest row; this table was not written by save_model() or is incomplete"
    )


def model_rows(spark: SparkSession, table: str, version: int) -> tuple[Iterator[ChunkRow], str]:
    """The rows of ``table@version`` (pyarrow when possible, else Spark) and how they are read."""
    located = locate_model(spark, table, version)
    where = f"{table}@v{version}"
    if located is not None:
        return rows_from_files(located.files, where=where), "pyarrow"
    return _spark_rows(_read_version(spark, table, version), where), "spark"


def read_model(
    spark: SparkSession,
    table: str,
    *,
    version: int | None = None,
    sink: Callable[[str, int, bytes], T],
) -> StoredModel[T]:
    """Stream one version of a model table, check it, and hand each chunk to ``sink``.

    ``sink(path, chunk_index, data)`` returns what is kept for that chunk (a Ray ``ObjectRef``,
    an offset written, ...). Every chunk's sha256, every path, and the chunk set of every file
    are checked against the manifest; any gap raises :class:`ModelTableError` naming the table,
    version and file. The rows are read with pyarrow straight from the version's Parquet files
    when the table allows it (no model bytes in the JVM), else through Spark.
    """
    v = resolve_version(spark, table, version)
    where = f"{table}@v{v}"
    rows, how = model_rows(spark, table, v)
    log.debug("%s: reading the rows with %s", where, how)
    manifest, chunks = _collect(rows, where, lambda r, path: sink(path, int(r.chunk_index), r.data))
    return StoredModel(table=table, version=v, manifest=manifest, chunks=chunks)


def write_model(rows: Iterator[ChunkRow], dest: str | os.PathLike[str], *, where: str) -> Manifest:
    """Write a model version's rows, in any order, as files under the existing folder ``dest``;
    check every chunk, then every file's size and sha256; return the manifest.

    Each chunk is written at its offset in its file (chunk ``i`` of ``n`` starts at ``i`` times
    the length of a full chunk; the last one ends at the file's size), so nothing is buffered.
    On an error the caller removes ``dest``'s content.

    >>> import hashlib, tempfile
    >>> sha = lambda b: hashlib.sha256(b).hexdigest()
    >>> body = b"hello world"
    >>> m = Manifest(files=(ModelFile("a.txt", 11, sha(body), 2),), dirs=(), chunk_size=8)
    >>> rows = [ChunkRow("file", "a.txt", 1, 2, 11, sha(body), sha(b"rld"), b"rld"),
    ...         ChunkRow("manifest", "", 0, 1, 0, "", "", m.to_json()),
    ...         ChunkRow("file", "a.txt", 0, 2, 11, sha(body), sha(b"hello wo"), b"hello wo")]
    >>> dest = tempfile.mkdtemp()
    >>> write_model(iter(rows), dest, where="t@v0") == m
    True
    >>> (Path(dest) / "a.txt").read_bytes()
    b'hello world'
    >>> shutil.rmtree(dest)
    """
    root = Path(dest).resolve()
    handles: dict[str, int] = {}

    def keep(r: ChunkRow, path: str) -> None:
        fd = handles.get(path)
        if fd is None:
            target = _inside(root, path, where=where)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = handles[path] = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        idx, n = int(r.chunk_index), int(r.num_chunks)
        offset = idx * len(r.data) if idx < n - 1 else int(r.file_size) - len(r.data)
        if offset < 0:
            raise ModelTableError(
                f"{where}: chunk {idx} of {path!r} is longer than the file; re-save the model"
            )
        data, written = memoryview(r.data), 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)

    try:
        manifest, _ = _collect(rows, where, keep)
    finally:
        for fd in handles.values():
            os.close(fd)
    for d in manifest.dirs:
        _inside(root, d, where=where).mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        target = _inside(root, f.path, where=where)
        size = target.stat().st_size
        digest = _sha256_file(target) if size == f.size else ""
        if digest != f.sha256:
            raise ModelTableError(
                f"{where}: file {f.path!r} fails its check after loading (size {size}, expected "
                f"{f.size}; sha256 {'ok' if digest == f.sha256 else 'mismatch'}); re-save the "
                "model with save_model()"
            )
    return manifest


def _inside(root: Path, rel: str, *, where: str) -> Path:
    target = (root / rel).resolve()
    if os.path.commonpath([str(root), str(target)]) != str(root):
        raise ModelTableError(f"{where}: stored path {rel!r} resolves outside the model folder")
    return target


def materialize(
    manifest: Manifest,
    fetch: Callable[[str, int], bytes],
    dest: str | os.PathLike[str],
    *,
    where: str,
) -> Path:
    """Write the model's files into ``dest`` (which must exist and be empty), checking each
    path stays inside ``dest`` and each file's size and sha256.

    ``fetch(path, chunk_index)`` returns a chunk's bytes. Used by the Ray actors when the driver
    sent the chunks through the object store (``model_source="object_store"``).
    """
    root = Path(dest).resolve()
    for d in manifest.dirs:
        _inside(root, check_relative_path(d, where=where), where=where).mkdir(
            parents=True, exist_ok=True
        )
    for f in manifest.files:
        target = _inside(root, check_relative_path(f.path, where=where), where=where)
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            for idx in range(f.num_chunks):
                data = fetch(f.path, idx)
                h.update(data)
                size += len(data)
                out.write(data)
        if size != f.size or h.hexdigest() != f.sha256:
            raise ModelTableError(
                f"{where}: file {f.path!r} fails its check after loading (size {size}, expected "
                f"{f.size}; sha256 {'ok' if h.hexdigest() == f.sha256 else 'mismatch'}); re-save "
                "the model with save_model()"
            )
    return root


def load_model(
    spark: SparkSession,
    table: str,
    dest: str | os.PathLike[str],
    *,
    version: int | None = None,
) -> StoredModel[None]:
    """Write one version of a model table back into the empty or new folder ``dest``, byte for
    byte, and return what was loaded. On any error ``dest`` is left empty again.

    Example::

        stored = load_model(spark, "ai_model.mnist_model", "/tmp/restored", version=0)
        print(stored.version, [f.path for f in stored.manifest.files])
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root}: the folder is not empty; load_model() needs an empty folder")
    v = resolve_version(spark, table, version)
    where = f"{table}@v{v}"
    try:
        rows, _ = model_rows(spark, table, v)
        manifest = write_model(rows, root, where=where)
    except BaseException:
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise
    return StoredModel(table=table, version=v, manifest=manifest, chunks={})
