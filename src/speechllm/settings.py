"""Typed `--settings` of a pipeline step.

A rule builds its step's settings as one JSON object from config slices (rules/*.smk, rules/common.smk); the
step parses it into a frozen dataclass (one per step, in `<package>/settings.py`) whose fields are exactly the
keys the step reads. A nested object is a nested dataclass; a field's config key is `<SECTION>.<name>` (the
section the rule copies the object from) unless its `setting(config=...)` names another. A missing or wrongly
typed key is a one-line ValueError naming the config key, e.g.
`settings key evaluate.num_beams: expected int, got str`.

Keys a dataclass has no field for are ignored: rules pass whole config sections (e.g. all of `data.tts`, or
`evaluate` without `shards` / `design`) so that a step's output is keyed on the section, and the schema
(workflow/schemas/config.schema.yaml) already rejects unknown config keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

S = TypeVar("S", bound="StepSettings")

_JSON_NAMES = {
    dict: "object",
    list: "list",
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    type(None): "null",
}


def setting(
    config: str | None = None, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING
) -> Any:
    """A field whose config key is `config` (default: the section's key of the same name). A default only
    where the step has always read the key with a fallback (`s.get(key, default)`): config holds defaults."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"config": config} if config else {}
    )


def config_choice(value: str, choices: tuple[str, ...], key: str) -> str:
    """`value` if it is one of `choices`, else ValueError naming config key `key` and the choices (for
    functions that take a switch's value directly, not only through a parsed step)."""
    if value not in choices:
        name = key.rsplit(".", 1)[-1]
        raise ValueError(f"unknown {name} {value!r} (config key {key}: {'|'.join(choices)})")
    return value


class StepSettings:
    """Base of a step's settings dataclass; `SECTION` is the config section the settings object mirrors."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_settings(cls: type[S], raw: Any, where: str = "settings") -> S:
        """Parse the step's JSON settings; ValueError `<where> key <config key>: ...` if it does not fit."""
        return parse(cls, raw, cls.SECTION, where)

    @classmethod
    def from_section(cls: type[S], raw: Any, where: str = "settings") -> S:
        """Parse `raw[SECTION]`: settings that carry the section as one key (`{"evaluate": {...}, ...}`)."""
        if not isinstance(raw, dict) or cls.SECTION not in raw:
            raise ValueError(f"{where} key {cls.SECTION}: missing")
        return cls.from_settings(raw[cls.SECTION], where)


def _name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _expected(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(k) for k in typing.get_args(kind))
    if dataclasses.is_dataclass(kind) or origin is dict:
        return "object"
    if origin is list:
        return "list"
    return _JSON_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse(cls: type[Any], raw: Any, key: str, where: str) -> Any:
    """A dataclass from the JSON object `raw` found at config key `key`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} key {key or '(top level)'}: expected object, got {_name(raw)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        field_key = field.metadata.get("config") or _join(key, field.name)
        if field.name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} key {field_key}: missing")
            continue
        values[field.name] = check(raw[field.name], hints[field.name], field_key, where)
    return cls(**values)


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # JSON does not tell 30 from 30.0; the value is kept as written
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(value: Any, kind: Any, key: str, where: str) -> Any:
    """`value` if it has type `kind` (nested dataclasses parsed), else ValueError naming `key`."""
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        return parse(kind, value, key, where)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return check(value, option, key, where)
            except ValueError as err:
                if len(options) == 1 and not str(err).startswith(f"{where} key {key}: "):
                    raise  # `X | None` where X is an object or list: the error names the nested key
    elif origin is list and isinstance(value, list):
        return [check(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {k: check(v, args[1], _join(key, k), where) for k, v in value.items()}
    elif origin is None and _fits(value, kind):
        return value
    raise ValueError(f"{where} key {key}: expected {_expected(kind)}, got {_name(value)}")


# Config sections several steps read.


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt frame: the text before and after the speech (models.prompt) or text (evaluate.st_prompt)."""

    prefix: str
    postfix: str


@dataclasses.dataclass(frozen=True)
class Wandb:
    """Config `wandb`."""

    project: str
    """wandb.project"""
    mode: str = setting(default="offline")
    """wandb.mode: online | offline | disabled (the WANDB_MODE environment variable wins)"""
