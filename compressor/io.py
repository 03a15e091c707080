"""Atomic writes: a file (or folder) appears whole or not at all, never half written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder, fsync its files, then swap it in place of ``path``.

    Files and folders get the usual permissions (0666 / 0777 less the umask, typically 0644 / 0755), whatever
    the writers inside ``fill`` used (some write through 0600 temporary files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            if f.is_dir() and not f.is_symlink():
                os.chmod(f, 0o777 & ~umask)
            elif f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path


def writable_dir(path: str | Path, key: str) -> Path:
    """Create the folder ``path`` if needed and check that a file can be written in it.

    Raises ConfigError naming ``key`` and the reason (a file in the way, no permission, a read-only or virtual
    file system) before any expensive work."""
    from compressor.config import ConfigError

    folder = Path(path).expanduser()
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == folder else f"is under {str(blocker)!r}, which is a file"
        raise ConfigError(f"{key}={str(path)!r} {where}: choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r} cannot be created or written to ({exc.strerror}): choose a folder "
                          "you can write to") from exc
    return folder


def folder_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_bench_results(path: str | Path, machine: str, records: list[dict]) -> Path:
    """A benchmark's results file in the anchors.md shape: machine, date, the command that ran, records."""
    import datetime
    import sys

    return atomic_write_json(path, {"machine": machine, "date": datetime.date.today().isoformat(),
                                    "command": "python " + " ".join(sys.argv), "records": records})
