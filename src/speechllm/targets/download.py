"""Downloads of released reference files, verified by sha256 before they replace the target atomically."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path

from speechllm.io import atomic_path

log = logging.getLogger("speechllm")
CHUNK_BYTES = 1 << 20


class DownloadError(ValueError):
    """A download that failed or does not match its expected hash; the message names the source."""


def _open(source: str):
    """http(s):// and file:// URLs through urllib; anything else is a local path."""
    if "://" in source:
        return urllib.request.urlopen(source)
    path = Path(source)
    if not path.is_file():
        raise DownloadError(f"{source}: no such file")
    return path.open("rb")


def fetch_verified(
    source: str, sha256: str | None, out: Path, key: str, check: Callable[[Path], None] | None = None
) -> str:
    """Copy `source` (URL or path) to `out`, hashing on the way; the file is moved into place only if its
    sha256 equals `sha256` (`None`: not pinned, the hash is logged) and `check(temp path)` passes.
    `key` names the config entry in errors. Returns the sha256."""
    digest = hashlib.sha256()
    with atomic_path(out) as tmp:
        try:
            with _open(source) as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
        except OSError as err:  # urllib's URLError is an OSError
            raise DownloadError(f"{source}: download failed ({err}) (config key {key}.url)") from err
        got = digest.hexdigest()
        if sha256 is None:
            log.warning(
                "%s: sha256 %s (not pinned: set %s.sha256 to verify future downloads)", source, got, key
            )
        elif got != sha256.lower():
            raise DownloadError(
                f"{source}: sha256 {got} does not match the expected {sha256} (config key {key}.sha256)"
            )
        if check is not None:
            check(tmp)
    log.info("%s -> %s (sha256 %s)", source, out, got)
    return got
