"""What every config section shares: the error, a field's type and choices, the choice and range checks.

``config.py`` composes the tree and checks it (``config.validate``); the objectives package owns its
own section (``objectives/config.py``: ``ObjectiveConfig``, its ranges and rules) and checks it with
the same functions, so an objective built without the loader is held to the same rules. Nothing
here imports anything of card_megatron.

A field's choices are its ``Literal`` type, or, when they come from a registry (``objective.name``:
the registered objectives), a callable in the field's metadata: ``field(metadata={"choices": f})``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from typing import Any, Literal, Optional

# The range of a numeric key: (low, high, low included, high included, note).
Range = tuple[float, float, bool, bool, str]


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message lists every problem."""


def field_types(cls: type) -> dict[str, Any]:
    """{field name: its resolved type} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_choices(cls: type, name: str) -> Optional[tuple[str, ...]]:
    """The choices of field ``name`` of ``cls``: its metadata's ``choices()``, else the values of a
    Literal (or Optional[Literal]) type, else None."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"]())
    tp = field_types(cls)[name]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def choice_problems(section: str, sub: Any) -> list[str]:
    """A problem for every key of one section whose value is not one of its choices."""
    p = []
    for name, tp in field_types(type(sub)).items():
        choices, value = field_choices(type(sub), name), getattr(sub, name)
        if choices and value is not None and value not in choices:
            optional = " (or none)" if typing.get_origin(tp) is typing.Union else ""
            p.append(f"{section}.{name} ({value!r}) must be one of {', '.join(choices)}{optional}")
    return p


def range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == math.inf:
        return f">= {low}" if low_in else ("positive" if low == 0 else f"> {low}")
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def range_problems(section_name: str, sub: Any, ranges: dict[str, Range]) -> list[str]:
    """A problem for every numeric key of one section outside its ``ranges`` entry ("section.key":
    :data:`Range`), NaN and infinity included."""
    p = []
    for name, (low, high, low_in, high_in, note) in ranges.items():
        section, key = name.split(".")
        if section != section_name:
            continue
        value = getattr(sub, key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{name} ({value}) must be a finite number")
        elif not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            p.append(f"{name} ({value}) must be {range_text(low, high, low_in, high_in)}{note}")
    return p


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass: {field name: text}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
