"""Installed package versions, read from their metadata without importing them (outputs record them)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(distribution: str) -> str | None:
    """`distribution`'s installed version (e.g. `rouge-score`), or None when it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
