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

Validation: a table is input from whoever can write it. The manifest is checked against a
schema (:func:`parse_manifest`, including a total size of at most ``max_model_bytes``, 64 GiB by
default) before any chunk is read, and each chunk row against the manifest as it arrives
(:func:`_collect`), so a lying table fails at its first lying row; the writer keeps at most
``MAX_OPEN_FILES`` files open (:func:`write_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

from spark_ray_udf import _delta
from spark_ray_udf.errors import (
    ConfigError,
    DestinationExistsError,
    ModelNotFoundError,
    ModelTableError,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

FORMAT = "spark-ray-udf/1"
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 512 * 1024 * 1024
# A model larger than this is refused unless the caller raises ``max_model_bytes``: it bounds
# what one lying manifest can make every actor (and the driver) write to disk.
DEFAULT_MAX_MODEL_BYTES = 64 * 1024**3
MAX_FILES = 1_000_000  # files (and, separately, folders) of one model
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_PATH_BYTES = 1024  # UTF-8 bytes of a stored path; leaves room for the actor's folder in PATH_MAX
MAX_NAME_BYTES = 255  # UTF-8 bytes of one path component (NAME_MAX of Linux file systems)
MAX_OPEN_FILES = 64  # files a reader writes into at once (write_model)
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
    def from_json(
        cls, data: bytes, *, where: str, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    ) -> Manifest:
        """Parse a manifest row and check it against the manifest's schema (see
        :func:`parse_manifest`); every failure is a :class:`ModelTableError`."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ModelTableError(
                f"{where}: the manifest row holds {len(data)} bytes, more than "
                f"{MAX_MANIFEST_BYTES}; {_RESAVE}"
            )
        try:
            doc = json.loads(bytes(data))
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deeply
            raise ModelTableError(
                f"{where}: the manifest row is unreadable ({type(exc).__name__}: "
                f"{str(exc)[:200]}); {_RESAVE}"
            ) from None
        return parse_manifest(doc, where=where, max_model_bytes=max_model_bytes)


_RESAVE = "re-save the model with save_model()"
_MANIFEST_KEYS = frozenset({"format", "files", "dirs", "chunk_size", "created", "source"})
_FILE_KEYS = frozenset({"path", "size", "sha256", "num_chunks"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_field(doc: Mapping[str, Any], key: str, lo: int, hi: int, *, where: str, what: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ModelTableError(
            f"{where}: {what}field {key!r} must be an integer in {lo}..{hi} (got "
            f"{_shown(value)} that is a {type(value).__name__}); {_RESAVE}"
        )
    return value


def _str_field(
    doc: Mapping[str, Any], key: str, *, where: str, what: str, default: str | None = None
) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or len(value) > 4096:
        raise ModelTableError(
            f"{where}: {what}field {key!r} must be a string of at most 4096 characters (got "
            f"{_shown(value)} that is a {type(value).__name__}); {_RESAVE}"
        )
    return value


def chunk_length(file: ModelFile, index: int, chunk_size: int) -> int:
    """How many bytes chunk ``index`` of ``file`` holds: ``chunk_size``, the rest for the last one.

    >>> chunk_length(ModelFile("a", 10, "", 3), 2, 4), chunk_length(ModelFile("e", 0, "", 1), 0, 4)
    (2, 0)
    """
    return max(0, min(chunk_size, file.size - index * chunk_size))


def parse_manifest(
    doc: Any, *, where: str, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> Manifest:
    """Check a decoded manifest against its schema and return it.

    The schema: an object with ``format`` (``spark-ray-udf/1``), ``chunk_size`` (an integer in
    1..512 MiB), ``files`` (at most ``MAX_FILES`` objects of exactly ``path``, ``size``, ``sha256``
    and ``num_chunks``), and optional ``dirs`` (paths), ``created``, ``source`` (strings); no other
    field. Each path passes :func:`check_relative_path`; no path is listed twice or is both a file
    and a folder (``a`` a file and ``a/b`` a file or folder); ``sha256`` is 64 lowercase hex
    digits; ``num_chunks`` is what ``size`` and ``chunk_size`` make it; the sizes add up to at most
    ``max_model_bytes``. Numbers must be JSON integers (``"12"`` is refused). Every failure is a
    :class:`ModelTableError` naming ``where``, the file and the field.

    >>> parse_manifest([], where="t@v3")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ModelTableError: t@v3: the manifest row is unreadable (a JSON list, expected an object); re-save the model with save_model()
    >>> doc = {"format": FORMAT, "chunk_size": 4, "files": [
    ...     {"path": "w.bin", "size": "10", "sha256": "0" * 64, "num_chunks": 3}]}
    >>> parse_manifest(doc, where="t@v3")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ModelTableError: t@v3: file 'w.bin' in the manifest: field 'size' must be an integer in 0..68719476736 (got '10' that is a str); re-save the model with save_model()
    """
    if not isinstance(doc, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
        raise ModelTableError(
            f"{where}: the manifest row is unreadable (a JSON {kind.get(type(doc), 'null')}, "
            f"expected an object); {_RESAVE}"
        )
    if doc.get("format") != FORMAT:
        raise ModelTableError(
            f"{where}: the manifest row is unreadable (format is {_shown(doc.get('format'))}, "
            f"expected {FORMAT!r}); {_RESAVE}"
        )
    unknown = sorted(str(k) for k in set(doc) - _MANIFEST_KEYS)
    if unknown:
        raise ModelTableError(f"{where}: the manifest has unknown fields {unknown}; {_RESAVE}")
    what = "the manifest's "
    chunk_size = _int_field(doc, "chunk_size", 1, MAX_CHUNK_SIZE, where=where, what=what)
    listed, dir_list = doc.get("files"), doc.get("dirs", [])
    for key, value in (("files", listed), ("dirs", dir_list)):
        if not isinstance(value, list) or len(value) > MAX_FILES:
            raise ModelTableError(
                f"{where}: {what}field {key!r} must be a list of at most {MAX_FILES} entries (got "
                f"{_shown(value) if not isinstance(value, list) else f'{len(value)} entries'}); "
                f"{_RESAVE}"
            )
    files: list[ModelFile] = []
    total = 0
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise ModelTableError(
                f"{where}: entry {i} of the manifest's 'files' must be an object (got "
                f"{_shown(entry)}); {_RESAVE}"
            )
        if not isinstance(entry.get("path"), str):
            raise ModelTableError(
                f"{where}: entry {i} of the manifest's 'files': field 'path' must be a string (got "
                f"{_shown(entry.get('path'))}); {_RESAVE}"
            )
        path = check_relative_path(entry["path"], where=where)
        what = f"file {path!r} in the manifest: "
        if set(entry) != _FILE_KEYS:
            raise ModelTableError(
                f"{where}: {what}fields must be {sorted(_FILE_KEYS)} (got {sorted(map(str, entry))}); "
                f"{_RESAVE}"
            )
        size = _int_field(entry, "size", 0, max_model_bytes, where=where, what=what)
        if size > max_model_bytes - total:
            raise _too_large(where, total + size, max_model_bytes, path)
        total += size
        sha = entry["sha256"]
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise ModelTableError(
                f"{where}: {what}field 'sha256' must be 64 lowercase hex digits (got "
                f"{_shown(sha)}); {_RESAVE}"
            )
        want = max(1, -(-size // chunk_size))
        n = _int_field(entry, "num_chunks", 1, want, where=where, what=what)
        if n != want:
            raise ModelTableError(
                f"{where}: {what}field 'num_chunks' is {n}, but its size {size} in chunks of "
                f"{chunk_size} bytes makes {want}; {_RESAVE}"
            )
        files.append(ModelFile(path, size, sha, n))
    dirs: list[str] = []
    for i, d in enumerate(dir_list):
        if not isinstance(d, str):
            raise ModelTableError(
                f"{where}: entry {i} of the manifest's 'dirs' must be a string (got {_shown(d)}); "
                f"{_RESAVE}"
            )
        dirs.append(check_relative_path(d, where=where))
    _check_layout([f.path for f in files], dirs, where=where)
    return Manifest(
        files=tuple(files),
        dirs=tuple(dirs),
        chunk_size=chunk_size,
        created=_str_field(doc, "created", where=where, what="the manifest's ", default=""),
        source=_str_field(doc, "source", where=where, what="the manifest's ", default=""),
    )


def _too_large(where: str, total: int, limit: int, path: str) -> ModelTableError:
    return ModelTableError(
        f"{where}: the model's files add up to more than max_model_bytes={limit} (at least "
        f"{total} bytes, reached at file {path!r}, field 'size'); if the model really is this "
        "large, pass a larger max_model_bytes= to register_ray_model(), read_model() or "
        f"load_model(); else {_RESAVE}"
    )


def _check_layout(files: Sequence[str], dirs: Sequence[str], *, where: str) -> None:
    """Refuse a path listed twice, or one that is both a file and a folder.

    >>> _check_layout(["a/b", "c"], ["a", "d"], where="t@v0")
    >>> _check_layout(["a", "a/b"], [], where="t@v0")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ModelTableError: t@v0: the manifest lists 'a' as a file and 'a/b' inside it: a path cannot be both a file and a folder; re-save the model with save_model()
    """
    file_set: set[str] = set()
    for f in files:
        if f in file_set:
            raise ModelTableError(f"{where}: the manifest lists the file {f!r} twice; {_RESAVE}")
        file_set.add(f)
    dir_set: set[str] = set()
    for d in dirs:
        if d in dir_set or d in file_set:
            kind = "folder" if d in dir_set else "file and as a folder"
            raise ModelTableError(f"{where}: the manifest lists {d!r} twice (as a {kind}); {_RESAVE}")
        dir_set.add(d)
    for p in (*files, *dirs):
        parts = p.split("/")
        for k in range(1, len(parts)):
            prefix = "/".join(parts[:k])
            if prefix in file_set:
                raise ModelTableError(
                    f"{where}: the manifest lists {prefix!r} as a file and {p!r} inside it: a "
                    f"path cannot be both a file and a folder; {_RESAVE}"
                )


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
    if path is not None and not isinstance(path, str):
        raise ModelTableError(
            f"{where}: stored path {_shown(path)} is a {type(path).__name__}, not a string; {fix}"
        )
    if not path or "\x00" in path:
        raise ModelTableError(f"{where}: stored path {path!r} is empty or holds a NUL byte; {fix}")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelTableError(f"{where}: stored path {_shown(path)} is not valid UTF-8; {fix}") from None
    if len(raw) > MAX_PATH_BYTES:
        raise ModelTableError(
            f"{where}: stored path {_shown(path)} is {len(raw)} bytes long, more than "
            f"{MAX_PATH_BYTES}; {fix}"
        )
    long_name = next((p for p in path.split("/") if len(p.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long_name is not None:
        raise ModelTableError(
            f"{where}: stored path {_shown(path)} has a name of {len(long_name.encode('utf-8'))} "
            f"bytes ({_shown(long_name)}), more than {MAX_NAME_BYTES}; {fix}"
        )
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise ModelTableError(f"{where}: stored path {path!r} is absolute; {fix}")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise ModelTableError(f"{where}: stored path {path!r} escapes the model folder ('..'); {fix}")
    if any(p in ("", ".") for p in path.split("/")):
        raise ModelTableError(f"{where}: stored path {path!r} is not normalized; {fix}")
    return path


def _walk(model_dir: Path, *, follow_symlinks: bool = False) -> tuple[list[str], list[str]]:
    """The files and folders of ``model_dir``, relative and sorted (see :func:`save_model` for
    symbolic links). A link loop, a link out of the folder (unless ``follow_symlinks``), a broken
    link and anything but regular files and folders (a FIFO, socket or device) are refused."""
    files: list[str] = []
    dirs: list[str] = []
    real_root = os.path.realpath(model_dir)
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
        for name in dirnames:
            _check_link(model_dir, Path(root) / name, real_root, follow_symlinks)
            dirs.append(_saved_name(model_dir, (rel_root / name).as_posix()))
        for name in sorted(filenames):
            full = Path(root) / name
            _check_link(model_dir, full, real_root, follow_symlinks)
            rel = (rel_root / name).as_posix()
            try:
                mode = full.stat().st_mode
            except FileNotFoundError:
                raise ModelTableError(
                    f"{model_dir}: '{rel}' is a symbolic link to {os.readlink(full)!r}, which does "
                    "not exist; remove the link or restore its target, then save again"
                ) from None
            if not stat.S_ISREG(mode):
                raise ModelTableError(
                    f"{model_dir}: '{rel}' is not a regular file (a FIFO, socket or device); "
                    "save_model() stores files and folders only: remove it, then save again"
                )
            files.append(_saved_name(model_dir, rel))
    return files, dirs


def _saved_name(model_dir: Path, rel: str) -> str:
    """``rel`` if a model table can hold it (UTF-8, at most ``MAX_PATH_BYTES``), else refused."""
    try:
        size = len(rel.encode("utf-8"))
    except UnicodeEncodeError:
        raise ModelTableError(
            f"{model_dir}: the name {rel!r} is not valid UTF-8; rename it, then save again"
        ) from None
    if size > MAX_PATH_BYTES:
        raise ModelTableError(
            f"{model_dir}: the path {_shown(rel)} is {size} bytes long; model tables hold paths "
            f"of at most {MAX_PATH_BYTES} bytes: shorten it, then save again"
        )
    return rel


def _check_link(model_dir: Path, path: Path, real_root: str, follow_symlinks: bool) -> None:
    """Refuse a symbolic link whose target lies outside the model folder, unless followed."""
    if follow_symlinks or not path.is_symlink():
        return
    target = os.path.realpath(path)
    if os.path.commonpath([real_root, target]) != real_root:
        rel = path.relative_to(model_dir).as_posix()
        raise ModelTableError(
            f"{model_dir}: '{rel}' is a symbolic link to {target}, outside the model folder; "
            "save_model() stores only what is inside the folder: copy the target in, or pass "
            "follow_symlinks=True to store the target's bytes"
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_staging(
    model_dir: Path, staging_file: Path, chunk_size: int, *, follow_symlinks: bool = False
) -> Manifest:
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
    files, dirs = _walk(model_dir, follow_symlinks=follow_symlinks)
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
    follow_symlinks: bool = False,
) -> int:
    """Store every file of ``model_dir`` in the Delta table ``table`` and return the new version.

    ``table`` is a metastore name (``db.table``; the database is created if missing) or a path.
    ``mode="overwrite"`` commits a new version and keeps the earlier ones readable by number;
    ``mode="error"`` refuses to write into an existing table (:class:`ModelTableError`).

    Symbolic links: a link whose target is inside ``model_dir`` is stored as what it points to
    (a file link as a regular file holding the target's bytes, a folder link as a folder with
    its files; Delta rows have no link type, so :func:`load_model` writes regular files). A link
    whose target is outside ``model_dir`` is refused with :class:`ModelTableError` naming the
    link, unless ``follow_symlinks=True`` (then the outside target's bytes are stored the same
    way). A link loop, a broken link and FIFOs, sockets or devices are always refused. The
    files go through a
    staging Parquet file in ``staging_dir`` (a temporary folder by default; on a cluster, pass a
    folder the executors can read), one chunk at a time.

    Example (``spark`` is a Delta-enabled session, see :mod:`spark_ray_udf.testing`)::

        version = save_model(spark, "/tmp/mnist_model", "ai_model.mnist_model")
    """
    src = Path(model_dir)
    if not src.is_dir():
        raise ModelNotFoundError(f"{src}: not a folder; save_model() stores a model folder")
    if chunk_size <= 0 or chunk_size > 512 * 1024 * 1024:
        raise ConfigError(f"chunk_size must be in 1..512 MiB (got {chunk_size!r})")
    if mode not in ("overwrite", "error"):
        raise ConfigError(f"mode must be 'overwrite' or 'error' (got {mode!r})")
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
        manifest = _write_staging(src, staging_file, chunk_size, follow_symlinks=follow_symlinks)
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
            log.warning(
                "%s: listing the Delta log failed (%s); asking Spark's Delta history instead "
                "(~100 ms a call)", table, exc,
            )
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


# The column types a model table may have (Spark writes int for chunk_index; any integer width
# is read the same way).
_STRING, _INTEGER, _BINARY = "a string", "an integer", "binary"
_COLUMN_KINDS = {
    "kind": _STRING, "path": _STRING, "chunk_index": _INTEGER, "num_chunks": _INTEGER,
    "file_size": _INTEGER, "file_sha256": _STRING, "chunk_sha256": _STRING, "data": _BINARY,
}


def _wrong_columns(types: Mapping[str, str], where: str, uri: str = "") -> None:
    """Refuse columns of the wrong kind (``types``: column -> _STRING/_INTEGER/_BINARY/other)."""
    bad = [f"{c!r} is {types[c]}" for c, want in _COLUMN_KINDS.items() if types[c] != want]
    if bad:
        in_file = f" in {uri}" if uri else ""
        want = ", ".join(f"{c} {k}" for c, k in _COLUMN_KINDS.items())
        raise ModelTableError(
            f"{where}: not a model table (column {', '.join(bad)}{in_file}; expected {want}); "
            "model tables are written by save_model()"
        )


def _spark_kind(type_name: str) -> str:
    if type_name == "string":
        return _STRING
    if type_name in ("tinyint", "smallint", "int", "bigint"):
        return _INTEGER
    return _BINARY if type_name == "binary" else f"of type {type_name}"


def _spark_rows(df: DataFrame, where: str) -> Iterator[ChunkRow]:
    """The rows through Spark, the manifest row(s) first (a tiny filtered query), so that every
    chunk row can be checked against the manifest as it arrives."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise _not_model_table(where, missing, df.columns)
    _wrong_columns({f.name: _spark_kind(f.dataType.simpleString()) for f in df.schema.fields}, where)
    cols = df.select(*COLUMNS)
    for part in (cols.where("kind = 'manifest'"), cols.where("kind IS NULL OR kind <> 'manifest'")):
        for r in part.toLocalIterator(prefetchPartitions=False):
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
    """Stream the rows of a table version's Parquet files with pyarrow, a few chunks at a time,
    the manifest row(s) first (so every chunk row is checked against the manifest on arrival).

    Holds about one Parquet page plus four chunks in memory, however large the model; no JVM
    is involved. ``files`` come from :func:`locate_model`.
    """
    yield from _manifest_rows(files, where)
    for uri in files:
        with _open_parquet(uri, where=where) as pf:
            for batch in pf.iter_batches(batch_size=4, columns=list(COLUMNS)):
                for r in batch.to_pylist():
                    if r["kind"] == "manifest":
                        continue  # yielded first
                    r["data"] = r["data"] if r["data"] is not None else b""
                    yield ChunkRow(**r)


def _arrow_kind(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _STRING
    if pa.types.is_integer(t):
        return _INTEGER
    return _BINARY if pa.types.is_binary(t) or pa.types.is_large_binary(t) else f"of type {t}"


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
        schema = pf.schema_arrow
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise _not_model_table(where, missing, schema.names, uri)
        _wrong_columns({c: _arrow_kind(schema.field(c).type) for c in COLUMNS}, where, uri)
        yield pf


_NO_LIMIT = 1 << 62


def _check_facts(
    path: str, facts: tuple[Any, Any, Any], by_path: Mapping[str, ModelFile], where: str
) -> ModelFile:
    """The manifest entry of ``path``, after checking a row's (num_chunks, file_size, file_sha256)."""
    entry = by_path.get(path)
    if entry is None:
        raise ModelTableError(f"{where}: rows of {path!r} are not in the manifest; {_RESAVE}")
    for name, got, want in zip(
        ("num_chunks", "file_size", "file_sha256"), facts, (entry.num_chunks, entry.size, entry.sha256)
    ):
        if got != want:
            raise ModelTableError(
                f"{where}: a row of {path!r} has {name}={_shown(got)}, but the manifest lists "
                f"{_shown(want)}; {_RESAVE}"
            )
    return entry


def _row_facts(r: ChunkRow, path: str, where: str) -> tuple[int, int, int]:
    """``(chunk_index, num_chunks, file_size)`` of a row, after checking every field's type."""
    for name in ("chunk_index", "num_chunks", "file_size"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelTableError(
                f"{where}: a row of {path!r} has {name}={_shown(value)}, expected an integer; "
                f"{_RESAVE}"
            )
    for name in ("file_sha256", "chunk_sha256"):
        if not isinstance(getattr(r, name), str):
            raise ModelTableError(
                f"{where}: a row of {path!r} has {name}={_shown(getattr(r, name))}, expected a "
                f"string; {_RESAVE}"
            )
    if not isinstance(r.data, bytes):
        raise ModelTableError(f"{where}: a row of {path!r} holds no bytes in 'data'; {_RESAVE}")
    return r.chunk_index, r.num_chunks, r.file_size


def _offset_without_manifest(r: ChunkRow, path: str, idx: int, n: int, size: int, where: str) -> int:
    """Where a chunk that arrived before the manifest starts in its file, from the row alone:
    every chunk but the last holds the same length, the last one the rest. A row whose length
    cannot fit its declared size and count (one 10-byte chunk of a 1 TiB file) is refused."""
    ln = len(r.data)
    if n == 1:
        ok, offset = ln == size, 0
    elif idx < n - 1:
        ok, offset = 0 < ln and (n - 1) * ln < size <= n * ln, idx * ln
    else:
        rest = size - ln
        ok = 0 < ln and rest > 0 and rest % (n - 1) == 0 and ln <= rest // (n - 1) <= MAX_CHUNK_SIZE
        offset = rest
    if not ok:
        raise ModelTableError(
            f"{where}: chunk {idx} of {path!r} holds {ln} bytes, which cannot be chunk {idx} of a "
            f"file of {size} bytes in {n} chunks (fields file_size, num_chunks); {_RESAVE}"
        )
    return offset


def _collect(
    rows: Iterator[ChunkRow],
    where: str,
    keep: Callable[[ChunkRow, str, int], T],
    *,
    expected: Manifest | None = None,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> tuple[Manifest, dict[tuple[str, int], T]]:
    """Check every row of a model version against the manifest; ``keep(row, path, offset)`` each
    chunk (``offset``: where it starts in its file).

    The manifest is ``expected`` (already checked, e.g. by the driver) or the manifest row, which
    the readers yield first. Once it is known, each chunk row is checked *before* it is kept: its
    path is listed, its size, count and sha256 agree with the manifest, its length is exactly what
    the file's size and the chunk size make it, and its bytes match its sha256. So a lying table
    fails at its first lying row, and nothing is written beyond the sizes the manifest declares
    (and :func:`parse_manifest` bounds by ``max_model_bytes``). Rows that come before the
    manifest (``write_model`` takes any order) are checked on their own: sizes within
    ``max_model_bytes``, a length that fits the row's own size and count. At the end every chunk
    of every file must have come. Any gap raises :class:`ModelTableError` naming the table,
    version and file.
    """
    manifest = expected
    by_path = {f.path: f for f in expected.files} if expected is not None else {}
    manifest_rows = 0
    chunks: dict[tuple[str, int], T] = {}
    seen: dict[str, tuple[int, int, str]] = {}
    declared = 0  # sizes of the files seen before the manifest
    n_rows = 0
    for r in rows:
        n_rows += 1
        if r.kind == "manifest":
            manifest_rows += 1
            if manifest_rows > 1:
                raise ModelTableError(f"{where}: two manifest rows; {_RESAVE}")
            limit = max_model_bytes if expected is None else _NO_LIMIT
            found = Manifest.from_json(r.data or b"", where=where, max_model_bytes=limit)
            if expected is not None:
                if found != expected:
                    raise ModelTableError(
                        f"{where}: the manifest row differs from the one read at registration; "
                        "the table's files were rewritten: register the model again"
                    )
                continue
            manifest, by_path = found, {f.path: f for f in found.files}
            for path, facts in seen.items():
                _check_facts(path, facts, by_path, where)
            continue
        if r.kind != "file":
            raise ModelTableError(f"{where}: row of unknown kind {_shown(r.kind)}; {_RESAVE}")
        path = check_relative_path(r.path, where=where)
        idx, n, size = _row_facts(r, path, where)
        if not 0 <= idx < n:
            raise ModelTableError(
                f"{where}: chunk {idx} of {path!r} is out of range (the file has {n} chunks); "
                f"{_RESAVE}"
            )
        facts = (n, size, r.file_sha256)
        if manifest is not None:
            entry = _check_facts(path, facts, by_path, where)
            want = chunk_length(entry, idx, manifest.chunk_size)
            if len(r.data) != want:
                raise ModelTableError(
                    f"{where}: chunk {idx} of {path!r} holds {len(r.data)} bytes, but the "
                    f"manifest's file size {entry.size} and chunk size {manifest.chunk_size} make "
                    f"it {want} (field 'data'); {_RESAVE}"
                )
            offset = idx * manifest.chunk_size
        else:
            if path not in seen:
                if len(seen) >= MAX_FILES:
                    raise ModelTableError(f"{where}: rows of more than {MAX_FILES} files; {_RESAVE}")
                if not 0 <= size <= max_model_bytes - declared:
                    raise _too_large(where, declared + size, max_model_bytes, path)
                declared += size
            offset = _offset_without_manifest(r, path, idx, n, size, where)
        if hashlib.sha256(r.data).hexdigest() != r.chunk_sha256:
            raise ModelTableError(
                f"{where}: chunk {idx} of {path!r} fails its sha256 check; the table "
                "was modified or corrupted: re-save the model with save_model()"
            )
        key = (path, idx)
        if key in chunks:
            raise ModelTableError(f"{where}: chunk {idx} of {path!r} appears twice")
        if seen.setdefault(path, facts) != facts:
            raise ModelTableError(f"{where}: the rows of {path!r} disagree on its size or sha256")
        chunks[key] = keep(r, path, offset)
    if n_rows == 0:
        raise ModelTableError(f"{where}: the table is empty; save a model with save_model()")
    if manifest_rows == 0:
        raise ModelTableError(
            f"{where}: no manifest row; this table was not written by save_model() or is incomplete"
        )
    assert manifest is not None  # set by the manifest row, or expected
    for f in manifest.files:
        for idx in range(f.num_chunks):
            if (f.path, idx) not in chunks:
                raise ModelTableError(
                    f"{where}: chunk {idx} of {f.path!r} is missing ({f.num_chunks} expected); "
                    "re-save the model with save_model()"
                )
    return manifest, chunks


class Location(NamedTuple):
    """Where the actors can read a model version: ``stored`` (its manifest and Parquet files),
    or None and ``reason``, why they cannot (then the driver reads it, see :func:`read_model`)."""

    stored: StoredModel[Any] | None
    reason: str


def locate(
    spark: SparkSession, table: str, version: int, *, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> Location:
    """The manifest and Parquet files of ``table@version`` when pyarrow can read them directly
    (see :mod:`spark_ray_udf._delta`), else why not. Reads the manifest row only (checked with
    :func:`parse_manifest`, on this machine): no model bytes. Each reason is logged at WARNING."""
    ref = TableRef(table)
    where = f"{table}@v{version}"
    try:
        info = _delta.table_info(spark, table, is_path=ref.is_path)
    except Exception as exc:  # AnalysisException and friends: the Spark path reports them
        return _not_direct(where, f"DESCRIBE DETAIL failed ({type(exc).__name__}: {str(exc)[:300]})")
    if not info.direct:
        features = sorted(info.features & _delta.NOT_DIRECT)
        words = {"deletionVectors": "deletion vectors", "columnMapping": "column mapping"}
        uses = ", ".join(words.get(f, "catalog-managed commits") for f in features)
        return _not_direct(
            where, f"the table uses {uses} ({', '.join(features)}), so its Parquet files are not "
            "its rows"
        )
    files = sorted(_read_version(spark, table, version).inputFiles())
    if not files:
        raise ModelTableError(f"{where}: the table is empty; save a model with save_model()")
    try:
        fs, path = _delta.open_uri(files[0])
        readable = fs.get_file_info(path).is_file
    except (OSError, ValueError, NotImplementedError) as exc:
        return _not_direct(where, f"pyarrow cannot open {files[0]} ({type(exc).__name__}: {exc})")
    if not readable:
        return _not_direct(where, f"pyarrow does not see {files[0]}")
    manifest = _find_manifest(files, where, max_model_bytes=max_model_bytes)
    stored: StoredModel[Any] = StoredModel(
        table=table, version=version, manifest=manifest, chunks={}, files=tuple(files)
    )
    return Location(stored, "")


def _not_direct(where: str, reason: str) -> Location:
    log.warning("%s: the model is read through Spark by the driver: %s", where, reason)
    return Location(None, reason)


def locate_model(
    spark: SparkSession, table: str, version: int, *, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> StoredModel[Any] | None:
    """:func:`locate`'s ``stored``: the manifest and files of ``table@version``, or None."""
    return locate(spark, table, version, max_model_bytes=max_model_bytes).stored


def _manifest_rows(files: Sequence[str], where: str) -> Iterator[ChunkRow]:
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
                for batch in pf.iter_batches(batch_size=4, row_groups=[g], columns=list(COLUMNS)):
                    for r in batch.to_pylist():
                        if r["kind"] == "manifest":
                            r["data"] = r["data"] if r["data"] is not None else b""
                            yield ChunkRow(**r)


def _find_manifest(
    files: Sequence[str], where: str, *, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> Manifest:
    for r in _manifest_rows(files, where):
        return Manifest.from_json(r.data, where=where, max_model_bytes=max_model_bytes)
    raise ModelTableError(
        f"{where}: no manifest row; this table was not written by save_model() or is incomplete"
    )


def model_rows(
    spark: SparkSession, table: str, version: int, *, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> tuple[Iterator[ChunkRow], str, Manifest | None]:
    """The rows of ``table@version`` (pyarrow when possible, else Spark), manifest row first;
    how they are read; and the manifest when it was already read and checked (pyarrow)."""
    located = locate_model(spark, table, version, max_model_bytes=max_model_bytes)
    where = f"{table}@v{version}"
    if located is not None:
        return rows_from_files(located.files, where=where), "pyarrow", located.manifest
    return _spark_rows(_read_version(spark, table, version), where), "spark", None


def read_model(
    spark: SparkSession,
    table: str,
    *,
    version: int | None = None,
    sink: Callable[[str, int, bytes], T],
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> StoredModel[T]:
    """Stream one version of a model table, check it, and hand each chunk to ``sink``.

    ``sink(path, chunk_index, data)`` returns what is kept for that chunk (a Ray ``ObjectRef``,
    an offset written, ...). The manifest is checked against its schema first
    (:func:`parse_manifest`; a model over ``max_model_bytes``, 64 GiB by default, is refused),
    then every chunk as it arrives, before ``sink`` sees it: its sha256, path, length and the
    chunk set of every file (see :func:`_collect`); any gap raises :class:`ModelTableError`
    naming the table, version and file. The rows are read with pyarrow straight from the
    version's Parquet files when the table allows it (no model bytes in the JVM), else through
    Spark.
    """
    _check_limit(max_model_bytes)
    v = resolve_version(spark, table, version)
    where = f"{table}@v{v}"
    rows, how, expected = model_rows(spark, table, v, max_model_bytes=max_model_bytes)
    log.debug("%s: reading the rows with %s", where, how)
    manifest, chunks = _collect(
        rows,
        where,
        lambda r, path, offset: sink(path, int(r.chunk_index), r.data),
        expected=expected,
        max_model_bytes=max_model_bytes,
    )
    return StoredModel(table=table, version=v, manifest=manifest, chunks=chunks)


def _check_limit(max_model_bytes: int) -> None:
    if isinstance(max_model_bytes, bool) or not isinstance(max_model_bytes, int) or max_model_bytes < 1:
        raise ConfigError(f"max_model_bytes must be a positive int (got {max_model_bytes!r})")


def write_model(
    rows: Iterator[ChunkRow],
    dest: str | os.PathLike[str],
    *,
    where: str,
    expected: Manifest | None = None,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> Manifest:
    """Write a model version's rows, in any order, as files under the existing empty folder
    ``dest``; check every chunk as it arrives, then every file's size and sha256; return the
    manifest.

    Each chunk is written at its offset in its file (chunk ``i`` starts at ``i`` times the chunk
    size), so nothing is buffered, and a file only grows as its real chunks arrive (it is never
    created at its declared size). At most ``MAX_OPEN_FILES`` files are open at once (a file is
    closed when its last chunk is written, or when others need the slot), so a model of any
    number of files loads. ``expected`` is a manifest already checked (by the driver, against
    its ``max_model_bytes``): the table's manifest row must equal it. On an error the caller
    removes ``dest``'s content.

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
    open_files: OrderedDict[str, int] = OrderedDict()  # least recently written first
    to_write: dict[str, int] = {}  # chunks still to come, per file opened once

    def keep(r: ChunkRow, path: str, offset: int) -> None:
        fd = open_files.pop(path, None)
        if fd is None:
            target = _inside(root, path, where=where)
            flags = os.O_WRONLY
            try:
                if path not in to_write:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    flags |= os.O_CREAT | os.O_EXCL
                    to_write[path] = int(r.num_chunks)
                fd = os.open(target, flags, 0o600)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                raise ModelTableError(
                    f"{where}: cannot write {path!r} ({exc.strerror}): the table lists a path "
                    f"that is both a file and a folder, or twice; {_RESAVE}"
                ) from None
            while len(open_files) >= MAX_OPEN_FILES:
                os.close(open_files.popitem(last=False)[1])
        open_files[path] = fd
        data, written = memoryview(r.data), 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        to_write[path] -= 1
        if to_write[path] == 0:
            os.close(open_files.pop(path))

    try:
        manifest, _ = _collect(rows, where, keep, expected=expected, max_model_bytes=max_model_bytes)
    finally:
        for fd in open_files.values():
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
    path stays inside ``dest``, each chunk's length and each file's size and sha256.

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
        with open(target, "xb") as out:
            for idx in range(f.num_chunks):
                data = fetch(f.path, idx)
                want = chunk_length(f, idx, manifest.chunk_size)
                if len(data) != want:
                    raise ModelTableError(
                        f"{where}: chunk {idx} of {f.path!r} holds {len(data)} bytes, but the "
                        f"manifest's file size {f.size} and chunk size {manifest.chunk_size} make "
                        f"it {want}; {_RESAVE}"
                    )
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
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> StoredModel[None]:
    """Write one version of a model table back into the empty or new folder ``dest``, byte for
    byte, and return what was loaded. On any error ``dest`` is left empty again.

    The manifest is checked first (a model over ``max_model_bytes``, 64 GiB by default, is
    refused before any byte is written), then each chunk as it arrives (see :func:`read_model`).

    Example::

        stored = load_model(spark, "ai_model.mnist_model", "/tmp/restored", version=0)
        print(stored.version, [f.path for f in stored.manifest.files])
    """
    _check_limit(max_model_bytes)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise DestinationExistsError(f"{root}: the folder is not empty; load_model() needs an empty folder")
    v = resolve_version(spark, table, version)
    where = f"{table}@v{v}"
    try:
        rows, _, expected = model_rows(spark, table, v, max_model_bytes=max_model_bytes)
        manifest = write_model(
            rows, root, where=where, expected=expected, max_model_bytes=max_model_bytes
        )
    except BaseException:
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise
    return StoredModel(table=table, version=v, manifest=manifest, chunks={})
