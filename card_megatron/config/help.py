"""The configuration's help: every key with its type, default and one-line docstring
(``python -m card_megatron.train --help-config``) and the same as ``docs/config.md``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from card_megatron.config.schema import Config
from card_megatron.config_checks import field_choices, field_docs, field_types


def _type_text(tp: Any, choices: Optional[tuple[str, ...]]) -> str:
    optional = typing.get_origin(tp) is typing.Union
    if choices:
        text = " | ".join(choices)
    else:
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        text = getattr(base, "__name__", str(base))
    return f"{text} | none" if optional else text


def describe_config() -> list[tuple[str, str, str, str]]:
    """(section.key, type, default, description) of every config key, in declaration order."""
    rows = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        sub = getattr(defaults, section.name)
        docs, types = field_docs(type(sub)), field_types(type(sub))
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            rows.append(
                (
                    f"{section.name}.{f.name}",
                    _type_text(types[f.name], field_choices(type(sub), f.name)),
                    "none"
                    if default is None
                    else str(default).lower()
                    if isinstance(default, bool)
                    else repr(default)
                    if isinstance(default, str)
                    else str(default),
                    docs.get(f.name, ""),
                )
            )
    return rows


def config_help() -> str:
    """Every key with its type, default and description (``python -m card_megatron.train --help-config``)."""
    rows = describe_config()
    lines, section = [], None
    for key, tp, default, doc in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            cls = type(getattr(Config(), section))
            lines.append(f"{section}: {' '.join((cls.__doc__ or '').split())}")
        lines.append(f"  {key} = {default}  ({tp})\n      {doc}")
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/config.md: the same listing as a Markdown table per section (a test keeps the file current)."""
    out = [
        "# Configuration keys",
        "",
        "Generated from the field docstrings of `card_megatron/config/schema.py` and, for the objective section, "
        "`card_megatron/objectives/config.py` (`python -m card_megatron.train "
        "--help-config` prints the same). Override any key as `section.key=value`; numeric ranges are in "
        "`config.RANGES`.",
        "",
    ]
    section = None
    for key, tp, default, doc in describe_config():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            cls = type(getattr(Config(), section))
            out += [
                "",
                f"## {section}",
                "",
                " ".join((cls.__doc__ or "").split()),
                "",
                "| key | type | default | description |",
                "| --- | --- | --- | --- |",
            ]
        cells = [c.replace("|", "\\|").replace("<", "\\<") for c in (tp, doc)]
        out.append(f"| `{key}` | {cells[0]} | `{default}` | {cells[1]} |")
    return "\n".join(out[:4] + out[5:]) + "\n"
