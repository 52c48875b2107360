"""A Delta table's log and data files, reached without a Spark job where that is safe.

Two questions come up on every registration and every refresh poll: *which version is the
latest* and *which Parquet files hold version N*. Spark answers both (``DeltaTable.history``,
``DataFrame.inputFiles``), at ~100-300 ms each. The latest version of a table whose commits live
in its ``_delta_log`` folder is the highest ``<20 digits>.json`` file there: one listing. The
files of a version can then be read with pyarrow directly, by the driver or by a Ray actor,
without the JVM holding any model bytes, as long as the table's physical files are its logical
rows: no deletion vectors (deleted rows still in the files), no column mapping (physical column
names differ), no catalog-managed commits (the log folder lags the catalog). :func:`table_info`
says which case a table is.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from spark_ray_udf.errors import ModelTableError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^(\d{20})\.json$")
# Table features under which the Parquet files are not the table's rows, or the log folder is
# not the whole history: read such tables through Spark.
NOT_DIRECT = frozenset(
    {"deletionVectors", "columnMapping", "catalogManaged", "catalogOwned-preview"}
)


@dataclass(frozen=True)
class TableInfo:
    """Where a Delta table lives and which table features it uses."""

    table: str
    location: str
    features: frozenset[str]

    @property
    def direct(self) -> bool:
        """True when the table's Parquet files can be read as its rows (see the module doc)."""
        return not (self.features & NOT_DIRECT)


_INFO: dict[str, TableInfo] = {}
_INFO_LOCK = threading.Lock()


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a Hadoop-style file URI or local path.

    >>> fs, path = open_uri("file:/tmp/t/part-0.parquet")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp/t/part-0.parquet')
    >>> open_uri("file:///tmp/a%20b/x.parquet")[1]
    '/tmp/a b/x.parquet'
    """
    if uri.startswith("file:"):
        return pafs.LocalFileSystem(), unquote(urlparse(uri).path)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme in ("s3a", "s3n"):  # Hadoop's names for S3
        uri = f"s3://{rest}"
    return pafs.FileSystem.from_uri(uri)


def latest_from_log(location: str) -> int | None:
    """The highest commit number in ``<location>/_delta_log``, or None if there is none.

    Raises ``OSError`` (e.g. ``FileNotFoundError``) when the folder cannot be listed.
    """
    fs, path = open_uri(location)
    entries = fs.get_file_info(pafs.FileSelector(path.rstrip("/") + "/_delta_log"))
    versions = [int(m.group(1)) for e in entries if (m := _COMMIT.match(e.base_name))]
    return max(versions) if versions else None


def _quoted(table: str, is_path: bool) -> str:
    if is_path:
        return "delta.`" + table.replace("`", "``") + "`"
    return table


def table_info(spark: SparkSession, table: str, *, is_path: bool) -> TableInfo:
    """Location and table features of ``table`` (``DESCRIBE DETAIL``), remembered per table.

    Each call asks Spark again (features change with ``ALTER TABLE``); :func:`cached_info`
    returns the last answer without a Spark call.
    """
    row = spark.sql(f"DESCRIBE DETAIL {_quoted(table, is_path)}").select(
        "location", "tableFeatures"
    ).head()
    if row is None:
        raise ModelTableError(f"{table}: DESCRIBE DETAIL returned nothing; is it a Delta table?")
    info = TableInfo(table=table, location=str(row[0]), features=frozenset(row[1] or ()))
    with _INFO_LOCK:
        _INFO[table] = info
    return info


def cached_info(table: str) -> TableInfo | None:
    """The last :func:`table_info` answer for ``table``, if any."""
    with _INFO_LOCK:
        return _INFO.get(table)


def forget(table: str) -> None:
    """Drop what :func:`table_info` remembered about ``table`` (after an error that may mean it
    moved)."""
    with _INFO_LOCK:
        _INFO.pop(table, None)
