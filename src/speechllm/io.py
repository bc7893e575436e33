"""Atomic file writes: write to a temp file in the target's directory, then ``os.replace``.

A reader (or Snakemake) therefore sees either the old file, or the complete new one, never a
partial file. On any exception the temp file is removed and the target is left untouched.
Also the one JSON reader whose errors name the file, and the one streaming download (URL or path).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def _read_umask() -> int:
    """Return the process umask (read once, at import, to avoid racing other threads later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
CHUNK = 1 << 16  # bytes read at a time when scanning a file backwards
DOWNLOAD_CHUNK = 1 << 20  # bytes read at a time from a download


def fsync_path(path: Path) -> None:
    """Flush a written file's data (or a directory's entries, after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """`fsync_path` every regular file and directory under `root` (symbolic links are not followed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(Path(folder))


def os_error_behind(err: BaseException) -> OSError | None:
    """The OS error behind a failed write: `err` itself or one it was raised from (torch.save to a file
    object), or the `(os error N)` that safetensors (a Rust io::Error) puts in its message. None: not an
    OS error, or not an Exception (an interrupt is never restated)."""
    if not isinstance(err, Exception):
        return None
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _name_target(err: BaseException, target: Path) -> BaseException:
    """An OS error that does not name a file (ENOSPC from a write, a failed fsync, safetensors' own error
    for either) restated with the target."""
    cause = os_error_behind(err)
    if cause is not None and cause.filename is None:
        hint = "; free space there" if cause.errno == errno.ENOSPC else ""
        return OSError(cause.errno, f"{cause.strerror or cause} while writing {target}{hint}")
    return err


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it onto ``path`` on success, delete it on error.

    The temp name keeps the target's suffixes (``.scores.x1y2.tmp.json`` for ``scores.json``), so
    writers that infer the format from the extension behave as for the real target. The temp file
    exists (empty) when yielded; writers must overwrite it. The final file gets the usual
    ``0o666 & ~umask`` permissions rather than ``mkstemp``'s 0600. Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + "".join(target.suffixes)
    stem = target.name[: len(target.name) - len("".join(target.suffixes))] or target.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        named = _name_target(err, target)
        if named is err:
            raise
        raise named from err


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``path`` (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp directory next to ``path``; it replaces ``path`` on success, is deleted on error.

    A directory output (a saved model) thus appears complete or not at all; an existing ``path`` is moved
    aside first and deleted only after the new one is in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        fsync_tree(tmp)  # the rename must not publish files whose data a crash could still lose
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _name_target(err, target)
        if named is err:
            raise
        raise named from err


def drop_torn_tail(path: str | os.PathLike[str]) -> None:
    """Cut an append-only JSON Lines file (a resumable step's partial file) back to its last complete line:
    a kill mid-write leaves a torn last line, and the next appended line would be glued to it and lost."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        end = size - 1
        while end > 0:  # back to the newline that ends the last complete line, in blocks
            start = max(0, end - CHUNK)
            fh.seek(start)
            found = fh.read(end - start).rfind(b"\n")
            if found >= 0:
                fh.truncate(start + found + 1)
                return
            end = start
        fh.truncate(0)


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content; a missing or malformed file is an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


class DownloadFailed(OSError):
    """Reading a download failed (refused, timed out, cut short, empty). `filename` is the source, so that
    `atomic_path` does not restate it as a failed write of its target; write errors are not wrapped."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(None, reason, source)

    def __str__(self) -> str:
        return f"download of {self.filename} failed: {self.strerror}"


def _reason(err: BaseException) -> str:
    """What went wrong reading a download, without urllib's "<urlopen error ...>" wrapping."""
    if isinstance(err, urllib.error.HTTPError):
        return str(err)  # "HTTP Error 404: Not Found"
    reason = getattr(err, "reason", None)  # URLError
    if reason is None:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
    return str(reason) or type(err).__name__


def copy_source(source: str, dst: BinaryIO, timeout: float) -> tuple[int, str]:
    """Stream `source` (an http(s):// or file:// URL, or a local path) into `dst`; returns (bytes, sha256).

    Reading raises DownloadFailed: when the source cannot be opened, when a server sends nothing for
    `timeout` seconds, when the body is empty or shorter than the Content-Length the server announced
    (http.client ends a connection cut early as a short read, not an error). Errors writing `dst` pass."""
    read_errors = (OSError, http.client.HTTPException)
    try:
        if "://" in source:
            request = urllib.request.Request(source, headers={"User-Agent": "speechllm"})
            opened = urllib.request.urlopen(request, timeout=timeout)
        else:
            opened = Path(source).open("rb")  # noqa: SIM115 (closed by the `with` below)
    except read_errors as err:
        raise DownloadFailed(source, _reason(err)) from err
    digest = hashlib.sha256()
    total = 0
    with opened as src:
        while True:
            try:
                chunk = src.read(DOWNLOAD_CHUNK)
            except read_errors as err:
                raise DownloadFailed(source, _reason(err)) from err
            if not chunk:
                break
            digest.update(chunk)
            dst.write(chunk)
            total += len(chunk)
        headers = getattr(src, "headers", None)
        announced = headers.get("Content-Length") if headers is not None else None
    if announced is not None and announced.isdigit() and total != int(announced):
        raise DownloadFailed(source, f"cut short: {total} of {announced} bytes arrived")
    if total == 0:
        raise DownloadFailed(source, "0 bytes arrived")
    return total, digest.hexdigest()
