"""Prompts in, JSON lines out.

Prompt files: ``.jsonl`` / ``.json`` / ``.ndjson`` hold one JSON object per line with a
``prompt`` (preferred) or ``text`` string; any other file is plain text, one prompt per
line (blank lines skipped; write an empty JSON ``"prompt"`` for an unconditional one).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from card_megatron.fileio import atomic_open, check_writable  # noqa: F401 (check_writable: re-exported)

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path``; ValueError naming the file and line for anything malformed."""
    if not os.path.isfile(path):
        raise ValueError(f"--input-file {path} does not exist")
    prompts: list[str] = []
    is_json = path.lower().endswith(JSON_SUFFIXES)
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if not is_json:
                    prompts.append(line)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt' or 'text' key")
                value = record.get("prompt", record.get("text"))
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{number}: no string 'prompt' or 'text' key")
                prompts.append(value)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not prompts:
        raise ValueError(f"--input-file {path} holds no prompts")
    return prompts


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Writes one JSON object per line to ``path`` under a temporary name, then renames it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
