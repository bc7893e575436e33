"""Instruction template banks: lists of (prefix, postfix) pairs, sampled reproducibly."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from speechllm.targets.download import fetch_verified


class TemplateError(ValueError):
    pass


def builtin_templates() -> list[tuple[str, str]]:
    """The bank shipped with the package (`templates.json` next to this module), written for the demo."""
    pairs = json.loads((Path(__file__).parent / "templates.json").read_text(encoding="utf-8"))
    return [(prefix, postfix) for prefix, postfix in pairs]


def load_templates(source: str) -> list[tuple[str, str]]:
    """`builtin` = the demo bank shipped with the package; otherwise a templates.json path (the
    reference's)."""
    if source == "builtin":
        return builtin_templates()
    path = Path(source)
    if not path.is_file():
        raise TemplateError(f"template bank not found: {path} (config key targets.templates)")
    return parse_templates(path.read_bytes(), str(path))


def parse_templates(raw: bytes, name: str) -> list[tuple[str, str]]:
    """A templates.json (a JSON list of [prefix, postfix] string pairs); `name` is used in errors."""
    try:
        pairs = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TemplateError(f"{name}: not a UTF-8 JSON file ({err})") from err
    if not isinstance(pairs, list) or not pairs:
        raise TemplateError(f"{name}: expected a non-empty JSON list of [prefix, postfix] pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TemplateError(f"{name}: entry {i} is not a [prefix, postfix] pair of strings")
        out.append((pair[0], pair[1]))
    return out


def fetch_templates(url: str, sha256: str, out: Path, timeout: float) -> int:
    """Download the reference's templates.json to `out`, verified by sha256 and parsed before it is moved
    into place (config keys targets.templates_download.url/sha256; `timeout`: seconds a silent server is
    waited for). Returns the number of pairs."""
    count = []

    def check(tmp: Path) -> None:
        count.append(len(parse_templates(tmp.read_bytes(), url)))

    fetch_verified(url, sha256, out, "targets.templates_download", timeout, check)
    return count[0]


def bank_hash(templates: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(templates, ensure_ascii=False).encode()).hexdigest()[:16]


def draw_items(
    text_counts: dict[str, int], templates: list[tuple[str, str]], per_occurrence: int, seed: int
) -> list[tuple[str, str, str]]:
    """(text, prefix, postfix) items: `per_occurrence` × count templates per distinct text, drawn uniformly
    regardless of the text's language (as the reference). Texts are visited in sorted order for
    determinism."""
    rng = random.Random(seed)
    items = []
    for text in sorted(text_counts):
        for prefix, postfix in rng.choices(templates, k=per_occurrence * text_counts[text]):
            items.append((text, prefix, postfix))
    return items
