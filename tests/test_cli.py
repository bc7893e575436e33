"""The `speechllm` command line: every subcommand's --help ends with an example of itself (README promises it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from speechllm.cli import build_parser


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, (*path, name))


def parser_at(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_every_subcommand_help_shows_an_example_of_itself() -> None:
    paths = list(leaf_parsers(build_parser()))
    assert ("data", "prepare") in paths and ("evaluate", "rescore") in paths and len(paths) > 30
    missing = []
    for path in paths:
        epilog = parser_at(path).epilog or ""
        # evaluate's benchmark subcommands share one example (their options are the same)
        command = " ".join(("speechllm", *path)) if path[0] != "evaluate" else "speechllm evaluate"
        if "example" not in epilog or command not in epilog:
            missing.append(" ".join(path))
    assert not missing, f"subcommands without an example of themselves in --help: {missing}"
