"""The README is a short front door whose layout is accurate; docs/ links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 120


def layout_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def tracked_top_level() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line.split("/", 1)[0] for line in out.splitlines() if "/" in line and not line.startswith(".")}


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_README_LINES


def test_layout_lists_every_top_level_folder_and_package():
    block = layout_block()
    listed = set(re.findall(r"^([\w.-]+)/", block, re.M)) | set(re.findall(r"^  (\w+)/", block, re.M))
    folders = tracked_top_level()
    assert folders, "git ls-files listed nothing"
    assert folders <= listed, f"folders missing from the README's layout: {sorted(folders - listed)}"
    package = REPO / "src" / "speechllm"
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages <= listed, f"packages missing from the README's layout: {sorted(subpackages - listed)}"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    missing = {m for m in modules if m not in block}
    assert not missing, f"modules missing from the README's layout: {sorted(missing)}"


def test_every_doc_is_linked_from_the_readme_and_every_relative_link_resolves():
    readme = README.read_text(encoding="utf-8")
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, f"{doc.name} is not linked from the README"
    for page in [README, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: broken link {target}"


def test_docs_never_point_at_files_users_do_not_have():
    pages = [README, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    configs = sorted((REPO / "config").rglob("*.yaml"))
    sources = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "rules").glob("*.smk"))
    for path in pages + configs + sources:
        text = path.read_text(encoding="utf-8")
        assert "shared/spec" not in text, f"{path.relative_to(REPO)} cites ../shared/spec"
