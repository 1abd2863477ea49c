"""Text inputs of the preprocessing tool: files (JSONL, .jsonl.gz, .txt) and the built-in corpus.

Files are read in raw blocks cut at line ends (:func:`iter_chunks`) so that parsing,
decoding and tokenization all happen in worker processes; the reading process only
counts lines. ``builtin:python-docs`` is English prose that ships with every CPython:
the docstrings of the standard library (read with ``ast``, nothing is imported) and
``pydoc_data.topics``, in a fixed order.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("python-docs",)
# Stdlib directories holding tests, test data or third-party code rather than documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class InputSource:
    """One input: a file (``kind`` jsonl or txt, maybe gzip) or a built-in corpus (``kind`` builtin)."""

    name: str  # the path, or "builtin:python-docs"
    kind: str  # "jsonl" | "txt" | "builtin"
    gzip: bool = False

    def size_bytes(self) -> Optional[int]:
        """Bytes on disk (compressed for gzip), or None when unknown."""
        if self.kind == "builtin":
            return None
        try:
            return os.path.getsize(self.name)
        except OSError:
            return None


@dataclass
class Chunk:
    """A run of consecutive input lines (or built-in documents) handed to one worker.

    For an uncompressed regular file the chunk is a byte range (``offset``, ``length``) cut at
    line ends that the worker reads itself (``payload`` None); otherwise ``payload`` holds the
    raw bytes (ending with a line end) or, for a built-in corpus, a list of texts.
    ``input_pos`` is the reader's position in the source after this chunk (bytes on disk).
    """

    source: str
    kind: str
    payload: Union[bytes, list, None]
    offset: int
    length: int
    input_pos: int

    def data(self) -> Union[bytes, list]:
        """The chunk's bytes (read from the file for a byte range) or its texts."""
        if self.payload is not None:
            return self.payload
        try:
            with open(self.source, "rb") as f:
                data = os.pread(f.fileno(), self.length, self.offset)
        except OSError as e:
            raise ValueError(f"input {self.source}: cannot read ({e.strerror})") from None
        if len(data) != self.length:
            raise ValueError(f"input {self.source} changed while being read")
        return data if data.endswith(b"\n") else data + b"\n"


def _source_for(path: str) -> InputSource:
    lower = path.lower()
    gz = lower.endswith(".gz")
    base = lower[:-3] if gz else lower
    if base.endswith((".jsonl", ".json", ".ndjson")):
        return InputSource(path, "jsonl", gz)
    if base.endswith(".txt"):
        return InputSource(path, "txt", gz)
    raise ValueError(f"input {path}: unknown file type (expected .jsonl, .json, .ndjson or .txt, optionally .gz)")


def resolve_inputs(patterns: Sequence[str]) -> list[InputSource]:
    """Expands files and globs (sorted) into input sources; ValueError for no match or an unknown type."""
    if not patterns:
        raise ValueError("no input given (--input)")
    sources: list[InputSource] = []
    for pattern in patterns:
        if pattern.startswith(BUILTIN_PREFIX):
            name = pattern[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_CORPORA:
                raise ValueError(f"unknown built-in corpus {pattern!r} (available: "
                                 + ", ".join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA) + ")")
            sources.append(InputSource(pattern, "builtin"))
            continue
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
            if not matches:
                raise ValueError(f"input {pattern}: no file matches")
        else:
            if not os.path.exists(pattern):
                raise ValueError(f"input {pattern}: no such file")
            if os.path.isdir(pattern):
                raise ValueError(f"input {pattern} is a directory (give files or a glob)")
            matches = [pattern]
        sources.extend(_source_for(p) for p in matches)
    return sources


# -- the built-in corpus -----------------------------------------------------------
def _stdlib_sources() -> list[tuple[str, str]]:
    """(module name, path) of every stdlib ``.py`` file outside test/vendored dirs, sorted by name."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
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


def builtin_documents(name: str = "python-docs") -> Iterator[str]:
    """Yields the documents of a built-in corpus in a fixed order (lazily: the first few are cheap).

    ``python-docs``: standard-library docstrings (one document per module docstring and per
    public top-level function or class), then the ``pydoc_data.topics`` help topics.
    """
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX):]
    if name != "python-docs":
        raise ValueError(f"unknown built-in corpus {name!r} (available: {', '.join(BUILTIN_CORPORA)})")
    if _BUILTIN_CACHE:  # parsing the stdlib takes seconds; a run may read the corpus twice
        yield from _BUILTIN_CACHE
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
    _BUILTIN_CACHE.extend(docs)  # only once complete (about 2 MB)


_BUILTIN_CACHE: list[str] = []


# -- chunked reading -----------------------------------------------------------------
class _CountingReader:
    """A binary file object that remembers how many bytes were read from disk."""

    def __init__(self, f) -> None:
        self.f = f
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:  # used by gzip
        n = self.f.readinto(b)
        self.pos += n or 0
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()


def iter_chunks(source: InputSource, chunk_bytes: int = 1 << 20, chunk_docs: int = 256) -> Iterator[Chunk]:
    """Splits ``source`` into chunks of about ``chunk_bytes`` bytes cut at line ends.

    Built-in corpora come as lists of ``chunk_docs`` texts. Raises ValueError naming the file
    if it cannot be opened or is not valid gzip.
    """
    if source.kind == "builtin":
        batch: list[str] = []
        size = 0
        for text in builtin_documents(source.name):
            batch.append(text)
            size += len(text)
            if len(batch) >= chunk_docs:
                yield Chunk(source.name, "builtin", batch, 0, size, 0)
                batch, size = [], 0
        if batch:
            yield Chunk(source.name, "builtin", batch, 0, size, 0)
        return
    if not source.gzip and os.path.isfile(source.name):
        yield from _byte_range_chunks(source, chunk_bytes)
        return

    try:
        # Unbuffered: on a pipe each read returns what is there (one system call), so the reading
        # loop goes back to Python between reads, where signal handlers (Ctrl-C, SIGTERM) run.
        raw = open(source.name, "rb", buffering=0)
    except OSError as e:
        raise ValueError(f"input {source.name}: cannot open ({e.strerror})") from None
    counter = _CountingReader(raw)
    stream = gzip.GzipFile(fileobj=counter, mode="rb") if source.gzip else counter
    carry = b""
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise ValueError(f"input {source.name}: cannot read ({e})") from None
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1:]
            payload = data[: cut + 1]
            yield Chunk(source.name, source.kind, payload, 0, len(payload), counter.pos)
        if carry:
            yield Chunk(source.name, source.kind, carry + b"\n", 0, len(carry), counter.pos)
    finally:
        raw.close()


def _byte_range_chunks(source: InputSource, chunk_bytes: int) -> Iterator[Chunk]:
    """Byte ranges of an uncompressed file, each ending after a line end (or at the file end)."""
    try:
        f = open(source.name, "rb")
    except OSError as e:
        raise ValueError(f"input {source.name}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            # shrink the chunks near the end so that no worker idles long on the last one
            end = pos + max(min(chunk_bytes, (size - pos) // 8), min(chunk_bytes, 1 << 16))
            if end >= size:
                end = size
            else:
                f.seek(end)
                while True:
                    block = f.read(1 << 16)
                    if not block:
                        end = size
                        break
                    nl = block.find(b"\n")
                    if nl >= 0:
                        end += nl + 1
                        break
                    end += len(block)
            yield Chunk(source.name, source.kind, None, pos, end - pos, end)
            pos = end
