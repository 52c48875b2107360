"""One copy of a model's files per machine, shared by the actors that serve it there.

The folder of ``table@version`` (with one manifest) lives at
``<tempdir>/spark-ray-udf/models/<key>``, ``<key>`` a digest of table, version and manifest, so
actors of any pool serving the same bytes on one machine share it; ``<tempdir>`` is the
machine's own (each actor asks its own ``tempfile.gettempdir()``).

* :func:`acquire` takes the folder's lock (``<key>.lock``, ``fcntl.flock``, polled with a
  deadline); the first actor writes the files into a staging folder with ``fill`` (which checks
  every checksum), renames it into place and marks it complete (``<key>.complete``); later
  actors find it complete and only check the files' sizes. Each actor registers itself as a
  holder (``<key>.holders/<pid>``).
* :func:`release` removes the caller's holder; the last holder removes the folder.
* :func:`sweep` removes the holders of dead processes, and the folders nobody holds any more
  (an actor killed outright runs no cleanup).

Pure file-system code: no Ray, no Spark.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from spark_ray_udf.errors import CallTimeoutError
from spark_ray_udf.store import Manifest

log = logging.getLogger(__name__)


def models_root() -> Path:
    """Where this machine keeps the shared model folders."""
    return Path(tempfile.gettempdir()) / "spark-ray-udf" / "models"


def folder_key(table: str, version: int, manifest: Manifest) -> str:
    """The shared folder's name for these bytes.

    >>> m = Manifest(files=(), dirs=(), chunk_size=1)
    >>> folder_key("t", 1, m) == folder_key("t", 1, m) != folder_key("t", 2, m)
    True
    """
    h = hashlib.sha256(f"{table}@{version}\n".encode() + manifest.to_json())
    return h.hexdigest()[:32]


def pid_running(pid: int) -> bool:
    """True while a process ``pid`` exists on this machine.

    >>> pid_running(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


@contextlib.contextmanager
def _locked(lock: Path, *, timeout_s: float, what: str) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise CallTimeoutError(
                        f"{what}: another process held the lock {lock} for over {timeout_s:.0f}s "
                        "(writing the model files); raise init_timeout_s or remove the lock's "
                        "owner"
                    ) from exc
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holders(key_dir: Path) -> Path:
    return key_dir.with_name(key_dir.name + ".holders")


def _complete(key_dir: Path) -> Path:
    return key_dir.with_name(key_dir.name + ".complete")


def _live_holders(key_dir: Path) -> list[int]:
    """The PIDs holding ``key_dir``, after removing those of dead processes."""
    alive = []
    holders = _holders(key_dir)
    if not holders.is_dir():
        return alive
    for h in holders.iterdir():
        if h.name.isdigit() and pid_running(int(h.name)):
            alive.append(int(h.name))
        else:
            h.unlink(missing_ok=True)
    return alive


def _remove(key_dir: Path) -> None:
    _complete(key_dir).unlink(missing_ok=True)
    shutil.rmtree(key_dir, ignore_errors=True)
    shutil.rmtree(_holders(key_dir), ignore_errors=True)


def _sizes_match(key_dir: Path, manifest: Manifest) -> bool:
    try:
        return all((key_dir / f.path).stat().st_size == f.size for f in manifest.files)
    except OSError:
        return False


def acquire(
    key: str,
    manifest: Manifest,
    fill: Callable[[Path], None],
    *,
    timeout_s: float,
    where: str,
    root: Path | None = None,
) -> Path:
    """The shared folder holding ``manifest``'s files, written by ``fill`` if nobody has yet.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> m = Manifest(files=(), dirs=(), chunk_size=1)
    >>> a = acquire("k", m, lambda d: (d / "w.bin").write_bytes(b"x"), timeout_s=5, where="t@v0", root=root)
    >>> b = acquire("k", m, lambda d: 1 / 0, timeout_s=5, where="t@v0", root=root)  # not called again
    >>> a == b and (a / "w.bin").read_bytes() == b"x"
    True
    >>> release(a); a.exists()
    False
    """
    root = root or models_root()
    key_dir = root / key
    with _locked(root / f"{key}.lock", timeout_s=timeout_s, what=where):
        holders = _holders(key_dir)
        holders.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _complete(key_dir).exists() and key_dir.is_dir() and _sizes_match(key_dir, manifest):
            (holders / str(os.getpid())).touch()
            log.info("%s: using the model files already on this machine (%s)", where, key_dir)
            return key_dir
        shutil.rmtree(key_dir, ignore_errors=True)  # incomplete or damaged: write it again
        _complete(key_dir).unlink(missing_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.staging-", dir=root))
        try:
            fill(staging)
            staging.rename(key_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _complete(key_dir).touch()
        (holders / str(os.getpid())).touch()
        return key_dir


def release(key_dir: Path, *, timeout_s: float = 30.0) -> None:
    """Stop holding ``key_dir``; the last live holder removes it."""
    try:
        with _locked(key_dir.with_name(key_dir.name + ".lock"), timeout_s=timeout_s, what=str(key_dir)):
            (_holders(key_dir) / str(os.getpid())).unlink(missing_ok=True)
            if not _live_holders(key_dir):
                _remove(key_dir)
    except (OSError, CallTimeoutError):
        log.warning("could not release the shared model folder %s", key_dir, exc_info=True)


def sweep(root: Path | None = None, *, min_age_s: float = 60.0) -> list[Path]:
    """Remove shared folders no live process holds (and stale staging folders); return them.

    >>> import tempfile, pathlib
    >>> sweep(pathlib.Path(tempfile.mkdtemp()) / "absent")
    []
    """
    root = root or models_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for lock in root.glob("*.lock"):
        key_dir = root / lock.name[: -len(".lock")]
        try:
            with _locked(lock, timeout_s=0.5, what=str(key_dir)):
                if not _live_holders(key_dir) and (key_dir.exists() or _holders(key_dir).exists()):
                    _remove(key_dir)
                    removed.append(key_dir)
        except CallTimeoutError:
            continue  # someone is writing it right now
    for staging in root.glob("*.staging-*"):
        try:
            if time.time() - staging.stat().st_mtime > min_age_s:
                key = staging.name.split(".staging-")[0]
                with _locked(root / f"{key}.lock", timeout_s=0.5, what=str(staging)):
                    shutil.rmtree(staging, ignore_errors=True)
                    removed.append(staging)
        except (OSError, CallTimeoutError):
            continue
    return removed
