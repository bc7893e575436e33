"""Downloads of released reference files, verified by sha256 before they replace the target atomically."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from speechllm.io import DownloadFailed, atomic_path, copy_source

log = logging.getLogger("speechllm")


class DownloadError(ValueError):
    """A download that failed or does not match its expected hash; the message names the source."""


def fetch_verified(
    source: str,
    sha256: str | None,
    out: Path,
    key: str,
    timeout: float,
    check: Callable[[Path], None] | None = None,
) -> str:
    """Copy `source` (URL or path) to `out`, hashing on the way; the file is moved into place only if its
    sha256 equals `sha256` (`None`: not pinned, the hash is logged) and `check(temp path)` passes. A server
    silent for `timeout` seconds fails the download. `key` names the config entry in errors. Returns the
    sha256."""
    with atomic_path(out) as tmp:
        try:
            with tmp.open("wb") as dst:
                _, got = copy_source(source, dst, timeout)
        except DownloadFailed as err:
            # refused, timed out, missing path, cut or empty body; a write error names `out` (atomic_path)
            raise DownloadError(f"{err} (config key {key}.url)") from err
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
