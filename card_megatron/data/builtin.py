"""Built-in corpora of the preprocessing tool (``--input builtin:NAME``): nothing to download.

* ``python-docs``: English prose that ships with every CPython: the docstrings of the
  standard library (read with ``ast``, nothing is imported) and ``pydoc_data.topics``, in a
  fixed order. About 2 MB.
* ``python-code``: the standard library's own ``.py`` files, one document per file, each
  starting with a header line ``# file: json/decoder.py``. Tests, test data, ``__pycache__``,
  site-packages and vendored trees are left out (:data:`_SKIP_DIRS`). The order is that of
  the sha256 of the relative path: deterministic, and not alphabetical, so the contiguous
  document ranges that ``data.split`` takes for valid and test are a spread of modules.
  About 12 MB on CPython 3.11. Since every file is one document and the split assigns
  whole documents, no file is shared between the train, valid and test splits.
* ``synthetic-copy``: generated text that a trained CARD model should decode with many
  tokens per forward pass: each document is a string of random pseudo-words repeated
  several times (``"zusena loda gazime. zusena loda gazime. ..."``), so everything after
  the first period follows from the prefix. Its parameters are the fields of
  :class:`SyntheticCopySpec` (the command line uses the defaults; library callers pass
  their own spec to :func:`~card_megatron.data.corpus.builtin_source`).

:func:`builtin_parameters` gives what a corpus's contents depend on (Python version, file
count, spec fields), as recorded in the preprocessing sidecar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# name -> one line for --help and error messages
BUILTIN_CORPORA = {
    "python-docs": "stdlib docstrings and pydoc topics of this Python: English prose, ~2 MB",
    "python-code": "stdlib .py files, one per document under '# file: PATH', no tests, ~12 MB",
    "synthetic-copy": "pseudo-word strings each repeated several times: a copy task, ~9 MB",
}
# Stdlib directories holding tests, test data or third-party code rather than the library itself.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def builtin_name(name: str) -> str:
    """``name`` without the ``builtin:`` prefix; ValueError listing the corpora if it is unknown."""
    bare = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if bare not in BUILTIN_CORPORA:
        raise ValueError(
            f"unknown built-in corpus {name!r} (available: "
            + ", ".join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA)
            + ")"
        )
    return bare


def check_spec(name: str, spec: Optional[Any]) -> None:
    """ValueError unless ``spec`` fits the corpus: a :class:`SyntheticCopySpec` (or None) for
    synthetic-copy, None for the others (they have no parameters)."""
    bare = builtin_name(name)
    if spec is None:
        return
    if bare == "synthetic-copy":
        if not isinstance(spec, SyntheticCopySpec):
            raise ValueError(f"builtin:synthetic-copy takes a SyntheticCopySpec, got {type(spec).__name__}")
        return
    raise ValueError(f"builtin:{bare} has no parameters (spec must be None, got {type(spec).__name__})")


def builtin_documents(name: str = "python-docs", spec: Optional[Any] = None) -> Iterator[str]:
    """The documents of a built-in corpus, in their fixed order (lazily: the first few are cheap).

    ``spec`` is the corpus's parameters (only synthetic-copy has any; None = the defaults).
    """
    bare = builtin_name(name)
    check_spec(bare, spec)
    if bare == "python-docs":
        return _python_docs_documents()
    if bare == "python-code":
        return python_code_documents()
    return synthetic_copy_documents(spec or SyntheticCopySpec())


def builtin_parameters(name: str, spec: Optional[Any] = None) -> dict[str, Any]:
    """What the corpus's documents depend on, as JSON-ready values: the Python version (and for
    python-code the number of files), or the :class:`SyntheticCopySpec` fields."""
    bare = builtin_name(name)
    check_spec(bare, spec)
    if bare == "synthetic-copy":
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(spec or SyntheticCopySpec()).items()
        }
    params: dict[str, Any] = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }
    if bare == "python-code":
        params["num_files"] = len(python_code_files())
    return params


# -- the standard library ------------------------------------------------------------
def _stdlib_root() -> str:
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def _stdlib_sources() -> list[tuple[str, str]]:
    """(module name, path) of every stdlib ``.py`` file outside test/vendored dirs, sorted by name."""
    root = _stdlib_root()
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        if rel != "." and not os.path.isfile(os.path.join(dirpath, "__init__.py")):
            dirnames[:] = []
            continue
        for fn in filenames:
            if not fn.endswith(".py") or fn.startswith("test_"):
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            stem = fn[:-3]
            name = ".".join(parts + ([] if stem == "__init__" else [stem]))
            if name:
                found.append((name, os.path.join(dirpath, fn)))
    return sorted(found)


# -- python-docs -------------------------------------------------------------------------
def _signature(node) -> str:
    import ast

    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # pragma: no cover - malformed defaults
        return "(...)"


def _module_documents(module: str, path: str) -> list[str]:
    """Documents of one module: its docstring, then one per top-level function and class."""
    import ast
    import tokenize

    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    docs: list[str] = []
    mod_doc = ast.get_docstring(tree, clean=True)
    if mod_doc:
        docs.append(f"Module {module}\n\n{mod_doc}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and not node.name.startswith("_"):
                docs.append(f"{module}.{node.name}{_signature(node)}\n\n{doc}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            parts = []
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(f"class {module}.{node.name}\n\n{doc}")
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    mdoc = ast.get_docstring(item, clean=True)
                    if mdoc and (not item.name.startswith("_") or item.name == "__init__"):
                        parts.append(f"{node.name}.{item.name}{_signature(item)}\n\n{mdoc}")
            if parts:
                docs.append("\n\n".join(parts))
    return docs


def _python_docs_documents() -> Iterator[str]:
    """Standard-library docstrings (one document per module docstring and per public top-level
    function or class), then the ``pydoc_data.topics`` help topics."""
    if _DOCS_CACHE:  # parsing the stdlib takes seconds; a run may read the corpus twice
        yield from _DOCS_CACHE
        return
    docs: list[str] = []
    for module, path in _stdlib_sources():
        for doc in _module_documents(module, path):
            docs.append(doc)
            yield doc
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append(text)
            yield text
    _DOCS_CACHE.extend(docs)  # only once complete (about 2 MB)


_DOCS_CACHE: list[str] = []


# -- python-code -------------------------------------------------------------------------
def python_code_files() -> list[tuple[str, str]]:
    """(relative path with ``/`` separators, absolute path) of the python-code corpus's files,
    in corpus order: by the sha256 of the relative path."""
    root = _stdlib_root()
    files = [(os.path.relpath(path, root).replace(os.sep, "/"), path) for _, path in _stdlib_sources()]
    return sorted(files, key=lambda f: (hashlib.sha256(f[0].encode("utf-8")).hexdigest(), f[0]))


def python_code_documents() -> Iterator[str]:
    """One document per file of :func:`python_code_files`: ``"# file: {relative path}\\n"`` and
    the file's text (decoded as its encoding cookie says, newlines normalised). A file that
    cannot be read or decoded is skipped with a warning; an empty file is its header alone."""
    import tokenize

    for rel, path in python_code_files():
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError, OSError) as e:  # SyntaxError: a bad encoding cookie
            logger.warning("builtin:python-code: skipping %s (%s)", path, e)
            continue
        yield f"# file: {rel}\n{text}"


# -- synthetic-copy ----------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticCopySpec:
    """Parameters of ``builtin:synthetic-copy``. Ranges are (low, high), both included.

    The lexicon holds ``lexicon_size`` distinct pseudo-words of ``syllables_per_word``
    consonant+vowel syllables. A document picks ``words_per_string`` words from it uniformly
    (with replacement), joins them with spaces, ends them with a period, and repeats that
    string ``repeats`` times, separated by one space.
    """

    seed: int = 0
    """Seed of ``random.Random``: the lexicon, then the documents, are drawn from it in order."""
    num_documents: int = 20000
    """Documents in the corpus."""
    lexicon_size: int = 256
    """Distinct pseudo-words to draw from."""
    syllables_per_word: tuple[int, int] = (2, 3)
    """Syllables of each pseudo-word, as (low, high)."""
    words_per_string: tuple[int, int] = (8, 8)
    """Words in a document's repeated string, as (low, high). The default is one length (a period of
    9 tokens with single-piece words): measured with the demo model (tiny-cpu, 800 CARD steps),
    strings of 6-12 words were not yet copied (validation perplexity 164 at step 400, 152 at 600)
    while strings of 8 were (48 at step 400, 2.9 at 800). See docs/study.md."""
    repeats: tuple[int, int] = (6, 10)
    """Times the string occurs in a document, as (low, high)."""
    consonants: str = "bdfgklmnprstvz"
    """Letters that start a syllable."""
    vowels: str = "aeiou"
    """Letters that end a syllable."""

    def __post_init__(self):
        problems = []
        if self.num_documents < 0:
            problems.append(f"num_documents ({self.num_documents}) must be >= 0")
        for name in ("syllables_per_word", "words_per_string", "repeats"):
            value = getattr(self, name)
            if len(value) != 2 or not 1 <= value[0] <= value[1]:
                problems.append(f"{name} ({value}) must be (low, high) with 1 <= low <= high")
        if (
            not self.consonants
            or not self.vowels
            or len(set(self.consonants)) != len(self.consonants)
            or len(set(self.vowels)) != len(self.vowels)
            or set(self.consonants) & set(self.vowels)
        ):
            problems.append(
                f"consonants ({self.consonants!r}) and vowels ({self.vowels!r}) must be non-empty, "
                "without repeats and without a letter in common"
            )
        if self.lexicon_size < 1:
            problems.append(f"lexicon_size ({self.lexicon_size}) must be >= 1")
        elif not problems:
            syllables = len(self.consonants) * len(self.vowels)
            low, high = self.syllables_per_word
            possible = sum(syllables**n for n in range(low, high + 1))
            if self.lexicon_size > possible:
                problems.append(
                    f"lexicon_size ({self.lexicon_size}) exceeds the {possible} distinct words of "
                    f"{low}-{high} syllables; lower it or widen syllables_per_word"
                )
        if problems:
            raise ValueError("SyntheticCopySpec: " + "; ".join(problems))


def _below(rng: random.Random, n: int) -> int:
    """A uniform integer in [0, n) from ``rng.random()`` alone: the one method whose output
    Python promises not to change across versions (``randrange``/``choice`` do not promise)."""
    return min(int(rng.random() * n), n - 1)


def _between(rng: random.Random, bounds: tuple[int, int]) -> int:
    return bounds[0] + _below(rng, bounds[1] - bounds[0] + 1)


def _lexicon(spec: SyntheticCopySpec, rng: random.Random) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < spec.lexicon_size:
        word = "".join(
            spec.consonants[_below(rng, len(spec.consonants))] + spec.vowels[_below(rng, len(spec.vowels))]
            for _ in range(_between(rng, spec.syllables_per_word))
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def synthetic_copy_lexicon(spec: SyntheticCopySpec = SyntheticCopySpec()) -> list[str]:
    """The pseudo-words the documents of ``spec`` are made of, in the order they were drawn."""
    return _lexicon(spec, random.Random(spec.seed))


def synthetic_copy_documents(spec: SyntheticCopySpec = SyntheticCopySpec()) -> Iterator[str]:
    """The ``spec.num_documents`` documents of ``builtin:synthetic-copy``, generated lazily from
    ``random.Random(spec.seed)``: the same spec gives the same documents on every Python 3."""
    rng = random.Random(spec.seed)
    lexicon = _lexicon(spec, rng)
    for _ in range(spec.num_documents):
        words = [lexicon[_below(rng, len(lexicon))] for _ in range(_between(rng, spec.words_per_string))]
        string = " ".join(words) + "."
        yield " ".join([string] * _between(rng, spec.repeats))
