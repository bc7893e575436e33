"""Imports never run back up the layering stated in docs/development.md (issue #21)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "speechllm"
LAYERS = [
    {"io", "audio", "text", "stopping", "cliutils", "versions", "settings"},
    {"data"},
    {"models"},
    {"targets", "train", "evaluate", "plan"},
    {"demo"},
    {"report"},
    {
        "cli",
        "api",
        "infer",
        "publish",
        "workflow",
        "runrecord",
        "__init__",
    },  # __init__.py re-exports api.load
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
TOP = len(LAYERS) - 1


def rank_of(module: str) -> int:
    """A module's layer; every `*/commands.py` is CLI glue and sits with cli."""
    parts = module.split(".")
    return TOP if parts[-1] == "commands" else RANK[parts[0]]


def upward_imports(source: str, module: str) -> list[str]:
    own = rank_of(module)
    bad = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("speechllm"):
            names = [node.module] if node.module != "speechllm" else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("speechllm.")]
        for name in names:
            target = name.removeprefix("speechllm.").removeprefix("speechllm")
            if target and target.split(".")[0] in RANK and rank_of(target) > own:
                bad.append(f"{module} imports {name}")
    return bad


def test_no_module_imports_up_the_layering():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        bad += upward_imports(path.read_text(encoding="utf-8"), module)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "from speechllm.train.schedule import warmup_lr",
        "import speechllm.demo.build",
        "from speechllm import publish",
    ],
)
def test_a_planted_upward_import_is_caught(source):
    assert upward_imports(source, "models.frontend")
