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


def schema_node(schema: dict, key: str) -> dict | None:
    """The config schema's node for a dotted key (through $refs, additionalProperties maps and anyOf/oneOf
    alternatives), or None when the schema has no such key."""
    defs = schema.get("$defs", {})

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    node = schema
    for part in key.split("."):
        node = resolve(node)
        candidates = [node, *(resolve(alt) for alt in node.get("anyOf", []) + node.get("oneOf", []))]
        found = next((c["properties"][part] for c in candidates if part in c.get("properties", {})), None)
        if found is None and isinstance(node.get("additionalProperties"), dict):
            found = node["additionalProperties"]
        if found is None:
            return None
        node = found
    return resolve(node)


def test_config_settings_named_in_the_docs_exist_with_an_allowed_value():
    """A backticked `section.key: value` in the docs (or pyproject's comments) names a config key of the
    schema and, where the schema lists the allowed values, one of them."""
    import yaml

    schema = yaml.safe_load(
        (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8")
    )
    sections = set(schema["properties"])
    pages = [README, REPO / "pyproject.toml", *sorted((REPO / "docs").glob("*.md"))]
    wrong = []
    for page in pages:
        for key, value in re.findall(
            r"`((?:[a-z0-9_]+\.)+[a-z0-9_]+): ([^`]+)`", page.read_text(encoding="utf-8")
        ):
            if key.split(".", 1)[0] not in sections:
                continue  # another tool's key (an ESPnet yaml's encoder_conf.*)
            node = schema_node(schema, key)
            if node is None:
                wrong.append(f"{page.name}: no config key {key}")
            elif "enum" in node and yaml.safe_load(value) not in node["enum"]:
                wrong.append(f"{page.name}: {key}: {value} is not one of {node['enum']}")
    assert not wrong, wrong


def test_repository_paths_named_in_the_docs_exist():
    """A backticked path into this repository (`src/speechllm/...`, `config/...`, ...) names a file or folder
    that is there (patterns and placeholders aside; a pytest id is checked as its file)."""
    pages = [README, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    prefixes = "src/speechllm|config|rules|scripts|tests|workflow|envs|profiles"
    for page in pages:
        for path in re.findall(rf"`((?:{prefixes})/[^`\s]+)`", page.read_text(encoding="utf-8")):
            path = path.split("::", 1)[0]
            if not re.search(r"[*<>{}]", path):
                assert (REPO / path).exists(), f"{page.relative_to(REPO)} names {path}, which does not exist"
