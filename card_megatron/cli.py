"""Typed command lines: an options dataclass becomes an argparse parser, checked like the training config.

Every tool (``card_megatron/tools/*.py``, ``apps/study``) declares its options as one dataclass of the
same kind as the training config (``config.py``): a one-line docstring under each field is its
``--help`` text (:func:`card_megatron.config_checks.field_docs`), a ``Literal`` type (or a registry callable in
the field's ``choices`` metadata) gives its choices, and a :data:`~card_megatron.config_checks.Range`
in the field's metadata bounds a number. :func:`build_parser` writes the parser from the class
(``--field-name`` flags, defaults shown in the help), :func:`check_options` collects every choice and
range problem, naming the flag and the value, and raises one ``ConfigError``. :func:`run_tool` is the
one entry helper: parse, configure logging, install the Transformer Engine/Apex start-up note
(``quiet_warnings``) once, check, run, and turn the errors a user can fix into one line and an exit
status.

    @dataclass
    class Options:
        checkpoint: str = option(metavar="PATH")
        \"\"\"A run directory or an export.\"\"\"
        batch_size: int = option(8, range=at_least(1))
        \"\"\"Windows per forward pass.\"\"\"
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import typing
from typing import Any, Callable, Optional

from card_megatron import quiet_warnings
from card_megatron.config_checks import ConfigError, Range, field_choices, field_docs, field_types, range_text

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    flag: Optional[str] = None,
    metavar: Optional[str] = None,
    group: Optional[str] = None,
    range: Optional[Range] = None,
    nargs: Optional[str] = None,
    choices: Optional[Callable[[], Any]] = None,
    default_text: Optional[str] = None,
    positional: bool = False,
) -> Any:
    """A dataclass field with its command-line details in the metadata. No default: a required flag.

    flag: the option string (default ``--field-name``; a bool field defaulting to true gets
    ``--no-field-name``); group: the help section; range: the number's bounds; nargs: ``"+"`` for a
    list given once (a list without nargs is a repeatable flag); choices: a callable returning the
    allowed values when they come from a registry (else the ``Literal`` type is used); default_text:
    how the help shows a default that is computed (``"all CPUs"``); positional: an argument without a
    flag (a list of them: ``section.key=value`` overrides)."""
    metadata = {
        k: v
        for k, v in dict(
            flag=flag,
            metavar=metavar,
            group=group,
            range=range,
            nargs=nargs,
            choices=choices,
            default_text=default_text,
            positional=positional or None,
        ).items()
        if v is not None
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def at_least(low: float, note: str = "") -> Range:
    """The range [low, inf)."""
    return (low, math.inf, True, True, note)


def positive(note: str = "") -> Range:
    """The range (0, inf)."""
    return (0, math.inf, False, True, note)


def flag_name(f: dataclasses.Field) -> str:
    """The option string of a field: its ``flag`` metadata, else ``--no-name`` for a bool defaulting to
    true, else ``--name`` (underscores as dashes)."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    prefix = "--no-" if f.default is True else "--"
    return prefix + f.name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """X of Optional[X]; the type itself otherwise."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _default_text(f: dataclasses.Field, default: Any) -> Optional[str]:
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    if default is MISSING or default is None or isinstance(default, bool) or default == []:
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of an options dataclass that are command-line options (``init=True``)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def build_parser(cls: type, *, description: str = "", epilog: Optional[str] = None, prog: Optional[str] = None):
    """The argparse parser of an options dataclass: one flag per field, help from the field's docstring
    with its default and range, choices from its ``Literal`` type, groups in the order first named."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    docs, types, groups = field_docs(cls), field_types(cls), {}
    for f in option_fields(cls):
        tp, default = types[f.name], _default_of(f)
        base = _base_type(tp)
        help_text = docs.get(f.name, "")
        shown = _default_text(f, default)
        notes = [range_text(*f.metadata["range"][:4])] if "range" in f.metadata else []
        notes += [f"default: {shown}"] if shown is not None else []
        if notes:
            help_text += f" ({'; '.join(notes)})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text.replace("%", "%%").strip()}
        if base is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            if typing.get_origin(base) is list:
                element = typing.get_args(base)[0]
                if "nargs" in f.metadata:
                    kwargs["nargs"] = f.metadata["nargs"]
                else:
                    kwargs["action"] = "append"
                base = element
            choices = field_choices(cls, f.name)
            if choices is not None:
                kwargs["choices"] = choices
            elif base in (int, float):
                kwargs["type"] = base
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
            if default is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        group = f.metadata.get("group")
        target = parser
        if group:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            target = groups[group]
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            kwargs.pop("required", None)
            if kwargs.pop("action", None) == "append":
                kwargs["nargs"] = "*"
            target.add_argument(f.name, **kwargs)
        else:
            target.add_argument(flag_name(f), **kwargs)
    return parser


def option_problems(opts: Any) -> list[str]:
    """A problem for every option whose value is not one of its choices or outside its range, each
    naming the flag and the value (NaN and infinity are outside every range)."""
    problems = []
    for f in option_fields(type(opts)):
        value, flag = getattr(opts, f.name), flag_name(f)
        values = value if isinstance(value, list) else [value]
        choices = field_choices(type(opts), f.name)
        for v in values:
            if v is None:
                continue
            if choices is not None and v not in choices:
                problems.append(f"{flag} ({v!r}) must be one of {', '.join(map(str, choices))}")
            if "range" in f.metadata:
                low, high, low_in, high_in, note = f.metadata["range"]
                if isinstance(v, float) and not math.isfinite(v):
                    problems.append(f"{flag} ({v}) must be a finite number")
                elif not ((low <= v if low_in else low < v) and (v <= high if high_in else v < high)):
                    problems.append(f"{flag} ({v}) must be {range_text(low, high, low_in, high_in)}{note}")
    return problems


def check_options(opts: Any) -> None:
    """Raises one ConfigError listing every choice and range problem of ``opts`` (see :func:`option_problems`)."""
    problems = option_problems(opts)
    if problems:
        raise ConfigError("; ".join(problems))


def parse_options(cls: type, argv: Optional[list[str]] = None, **parser_kwargs: Any) -> Any:
    """The options dataclass filled from the command line (not yet checked: :func:`check_options`)."""
    # intermixed: positional overrides may come before and after the flags, as for training
    namespace = build_parser(cls, **parser_kwargs).parse_intermixed_args(argv)
    return cls(**{f.name: getattr(namespace, f.name) for f in option_fields(cls)})


def start_logging(
    level: Optional[int | str] = logging.WARNING,
    fmt: str = "%(levelname)s %(name)s: %(message)s",
    megatron: bool = True,
    **kwargs: Any,
) -> None:
    """Configures logging (``logging.basicConfig``; not when ``level`` is None: an entry point whose
    library configures it, lm-eval's) and installs the Transformer Engine/Apex start-up note
    (``quiet_warnings``): what every entry point does first, before anything imports Megatron-core.
    ``megatron=False``: the entry point never imports Megatron-core (tokenization), so no note."""
    if level is not None:
        logging.basicConfig(level=level, format=fmt, **kwargs)
    if megatron:
        quiet_warnings.install()


def run_tool(
    cls: type,
    run: Callable[[Any], int],
    argv: Optional[list[str]] = None,
    *,
    description: str = "",
    epilog: Optional[str] = None,
    prog: Optional[str] = None,
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
    error_status: int = 1,
    error_prefix: str = "error: ",
    log_level: int = logging.WARNING,
    log_format: str = "%(levelname)s %(name)s: %(message)s",
    log_datefmt: Optional[str] = None,
) -> int:
    """The entry helper of every tool: parse ``argv`` into ``cls``, start logging (with the start-up
    note), check the options, call ``run(options)`` and return its status. A user error (one of
    ``errors``, a bad option value included) prints one line ``{error_prefix}{message}`` on stderr and
    returns ``error_status``; Ctrl-C returns 130."""
    opts = parse_options(cls, argv, description=description, epilog=epilog, prog=prog)
    start_logging(log_level, log_format, datefmt=log_datefmt)
    try:
        check_options(opts)
        return run(opts)
    except errors as e:
        print(f"{error_prefix}{e}", file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print(f"{error_prefix.removesuffix('error: ')}interrupted", file=sys.stderr)
        return 130


def doc_parts(doc: Optional[str]) -> tuple[str, str]:
    """(description, epilog) of a tool module's docstring: its first paragraph, and the rest."""
    first, _, rest = (doc or "").partition("\n\n")
    return first, rest


__all__ = [
    "ConfigError",
    "at_least",
    "build_parser",
    "check_options",
    "doc_parts",
    "flag_name",
    "option",
    "option_fields",
    "option_problems",
    "parse_options",
    "positive",
    "run_tool",
    "start_logging",
]
