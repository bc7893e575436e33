"""Instruction template banks: lists of (prefix, postfix) pairs, sampled reproducibly."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from speechllm.data.demo import demo_templates


class TemplateError(ValueError):
    pass


def load_templates(source: str) -> list[tuple[str, str]]:
    """`builtin` = the demo bank shipped with the package; otherwise a templates.json path (the reference's)."""
    if source == "builtin":
        return demo_templates()
    path = Path(source)
    if not path.is_file():
        raise TemplateError(f"template bank not found: {path} (config key targets.templates)")
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TemplateError(f"{path}: not valid JSON ({err.msg})") from err
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TemplateError(f"{path}: entry {i} is not a [prefix, postfix] pair of strings")
        out.append((pair[0], pair[1]))
    return out


def bank_hash(templates: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(templates, ensure_ascii=False).encode()).hexdigest()[:16]


def draw_items(text_counts: dict[str, int], templates: list[tuple[str, str]], per_occurrence: int,
               seed: int) -> list[tuple[str, str, str]]:
    """(text, prefix, postfix) items: `per_occurrence` × count templates per distinct text, drawn uniformly
    regardless of the text's language (as the reference). Texts are visited in sorted order for determinism."""
    rng = random.Random(seed)
    items = []
    for text in sorted(text_counts):
        for prefix, postfix in rng.choices(templates, k=per_occurrence * text_counts[text]):
            items.append((text, prefix, postfix))
    return items
