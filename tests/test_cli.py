"""The `speechllm` command line: every subcommand's --help ends with an example of itself (README promises
it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from speechllm.cli import build_parser
from speechllm.cliutils import RAW, add_command


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


def all_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, (*path, name))


def test_add_command_keeps_example_lines_and_sets_the_function() -> None:
    sub = argparse.ArgumentParser(prog="speechllm").add_subparsers(dest="command", required=True)
    run = add_command(
        sub, "run", "run it", print, description="first line\n  second line", epilog="example:\n  a\n  b"
    )
    group = add_command(sub, "group", "a group of subcommands")
    assert run.formatter_class is RAW and run.get_default("func") is print
    assert group.get_default("func") is None
    assert "first line\n  second line" in run.format_help() and run.format_help().endswith(
        "example:\n  a\n  b\n"
    )
    assert sub.choices["run"] is run and "run it" in sub._choices_actions[0].help


def test_every_parser_is_raw_and_every_subcommand_runs_a_function() -> None:
    parsers = dict(all_parsers(build_parser()))
    leaves = set(leaf_parsers(build_parser()))
    assert not [" ".join(path) for path, parser in parsers.items() if parser.formatter_class is not RAW]
    assert not [" ".join(path) for path in leaves if not callable(parsers[path].get_default("func"))]
    assert not [
        " ".join(path) for path in set(parsers) - leaves if parsers[path].get_default("func") is not None
    ]


def test_report_table_help_names_every_table() -> None:
    from speechllm.report.tables import TABLE_NAMES

    name = next(a for a in parser_at(("report", "table"))._actions if "--name" in a.option_strings)
    assert name.help.split(" | ") == list(TABLE_NAMES)


def test_bad_settings_json_is_one_line_naming_the_command(tmp_path) -> None:
    """A rule's --settings that is not a JSON object ends as `speechllm <command>: error: ...`, as every
    other bad input does."""
    import pytest

    from speechllm.cli import main

    m = str(tmp_path / "m.jsonl")
    for settings, expected in (
        ("{", r"^speechllm data prepare: error: --settings is not valid JSON: .* \(line 1 column 2\)$"),
        ("[1]", r"^speechllm data prepare: error: --settings must be a JSON object, not list$"),
    ):
        with pytest.raises(SystemExit, match=expected):
            main(["data", "prepare", "--settings", settings, "--manifest", m, "--out", m, "--report", m])
