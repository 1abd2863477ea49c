"""Tokenizer, built-in corpus and tools/preprocess_data.py end to end (CLI and library)."""

import dataclasses
import errno
import gzip
import hashlib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from card_megatron.data import preprocess as pp
from card_megatron.data import readers
from card_megatron.data.builtin import (
    SyntheticCopySpec,
    python_code_files,
    synthetic_copy_documents,
    synthetic_copy_lexicon,
)
from card_megatron.data.corpus import builtin_documents, builtin_parameters, builtin_source, fingerprint_documents
from card_megatron.data.shards import TokenShard
from card_megatron.tokenizers import MASK_PIECE, load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
ENV = {**os.environ, "PYTHONPATH": ROOT}


def run_tool(*args, timeout=120):
    return subprocess.run(
        [sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def docs():
    return list(itertools.islice(builtin_documents(), 200))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, docs):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    train_tokenizer(docs, path, vocab_size=600)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def write_jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def expected_tokens(tok, texts):
    return [np.array(tok.encode(t) + [tok.eos_id]) for t in texts]


def assert_shard(prefix, tok, texts):
    s = TokenShard(prefix)
    ref = expected_tokens(tok, texts)
    assert len(s) == len(ref)
    for i, r in enumerate(ref):
        np.testing.assert_array_equal(s[i], r)


# -- tokenizer ---------------------------------------------------------------------
def test_tokenizer_reserved_ids_and_round_trip(tok, docs):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == tok.num_pieces <= 600 and tok.sp.id_to_piece(4) == MASK_PIECE
    for text in docs[:50] + ["x <mask> y", "<mask>", "tabs\tand\nnewlines  and ünïcödé ✓"]:
        ids = tok.encode(text)
        assert tok.mask_id not in ids and tok.pad_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("ab") + [tok.mask_id, tok.eos_id, tok.pad_id]) == "ab"


def test_tokenizer_training_deterministic(tmp_path, docs, tok_path):
    again = str(tmp_path / "again.model")
    train_tokenizer(docs, again, vocab_size=600)
    assert open(again, "rb").read() == open(tok_path, "rb").read()


def test_tokenizer_without_mask_appends_it(tmp_path, docs):
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(d for doc in docs[:100] for d in doc.splitlines() if d.strip()),
        model_prefix=prefix,
        vocab_size=300,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    t = load_tokenizer(prefix + ".model")
    n = t.sp.get_piece_size()
    assert t.mask_id == n and t.pad_id == n + 1 and t.vocab_size == n + 2
    assert t.eos_id == t.sp.eos_id() and t.bos_id == t.sp.bos_id()
    assert t.decode(t.encode("hello") + [t.mask_id]) == t.sp.decode(t.encode("hello"))


def test_tokenizer_missing_or_corrupt(tmp_path):
    with pytest.raises(ValueError, match="not found: .*nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece model"):
        load_tokenizer(bad)


# -- built-in corpus -------------------------------------------------------------------
def test_builtin_corpus_deterministic_and_non_trivial(docs):
    code = (
        "import hashlib; from card_megatron.data.corpus import builtin_documents as b;"
        "d = list(b()); print(len(d), sum(map(len, d)), hashlib.sha256('\\x00'.join(d).encode()).hexdigest())"
    )
    other_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    full = list(builtin_documents())
    here = f"{len(full)} {sum(map(len, full))} {hashlib.sha256(chr(0).join(full).encode()).hexdigest()}"
    assert other_run.stdout.strip() == here
    assert full[:200] == docs and list(builtin_documents()) == full
    assert len(full) > 2000 and sum(map(len, full)) > 1_500_000  # about 2 MB of prose
    assert len(set(docs)) == len(docs) and all(d.strip() for d in full)
    assert any(d.startswith("Module json\n") for d in full)  # stdlib docstrings
    from pydoc_data.topics import topics

    assert topics["if"].strip() in full[-len(topics) :]  # pydoc topics


def test_synthetic_copy_deterministic_and_structured():
    spec = SyntheticCopySpec(num_documents=300, words_per_string=(6, 12))  # a range, to check both ends
    docs = list(synthetic_copy_documents(spec))
    assert docs == list(synthetic_copy_documents(spec)) == list(builtin_documents("builtin:synthetic-copy", spec))
    other = list(synthetic_copy_documents(dataclasses.replace(spec, seed=1)))
    assert (
        len(other) == 300
        and other != docs
        and synthetic_copy_lexicon(dataclasses.replace(spec, seed=1)) != synthetic_copy_lexicon(spec)
    )
    lexicon = synthetic_copy_lexicon(spec)
    assert len(lexicon) == len(set(lexicon)) == 256
    assert all(re.fullmatch("([bdfgklmnprstvz][aeiou]){2,3}", w) for w in lexicon)
    num_words, num_repeats = set(), set()
    for doc in docs:  # one string "w1 w2 ... wn." repeated, separated by one space
        string = doc[: doc.index(".") + 1]
        repeats = doc.count(".")
        assert doc == " ".join([string] * repeats)
        words = string[:-1].split(" ")
        assert set(words) <= set(lexicon)
        num_words.add(len(words))
        num_repeats.add(repeats)
    assert num_words == set(range(6, 13)) and num_repeats == set(range(6, 11))  # both ends included
    # the defaults the experiments start from
    default = SyntheticCopySpec()
    assert (default.seed, default.num_documents, default.lexicon_size) == (0, 20000, 256)
    # the generator itself is pinned (only random.Random.random() is used, stable across Python versions)
    pinned = SyntheticCopySpec(
        seed=0,
        num_documents=2,
        lexicon_size=256,
        syllables_per_word=(2, 3),
        words_per_string=(6, 12),
        repeats=(6, 10),
        consonants="bdfgklmnprstvz",
        vowels="aeiou",
    )
    assert list(synthetic_copy_documents(pinned)) == [
        " ".join(["tuga manatu zoba zavibi lesuvo sigilo."] * 10),
        " ".join(["godete pafu kuvu vudiki faro viva rorabo faro fibela bubaka kitapa."] * 8),
    ]
    with pytest.raises(ValueError, match=r"repeats \(\(3, 2\)\).*lexicon_size \(0\)"):
        SyntheticCopySpec(repeats=(3, 2), lexicon_size=0)
    with pytest.raises(ValueError, match="has no parameters"):
        builtin_source("python-code", spec)


def test_python_code_files_order_and_fingerprint():
    files = python_code_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels, key=lambda r: hashlib.sha256(r.encode()).hexdigest()) and rels != sorted(rels)
    assert len(set(rels)) == len(rels) > 300 and "json/decoder.py" in rels
    for rel in rels:
        parts = rel.split("/")
        assert not set(parts[:-1]) & {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}, rel
        assert not parts[-1].startswith("test_") and rel.endswith(".py"), rel
    docs = list(builtin_documents("builtin:python-code"))
    assert [d[: d.index("\n")] for d in docs] == [f"# file: {rel}" for rel in rels]  # one document per file
    path = dict(files)["json/decoder.py"]
    assert docs[rels.index("json/decoder.py")] == "# file: json/decoder.py\n" + open(path, encoding="utf-8").read()
    assert sum(map(len, docs)) > 5_000_000
    # stable across calls and processes (another hash seed too)
    here = fingerprint_documents(docs)
    assert fingerprint_documents(builtin_documents("python-code")) == here
    code = (
        "from card_megatron.data.corpus import builtin_documents as b, fingerprint_documents as f;"
        "print(f(b('python-code')))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**ENV, "PYTHONHASHSEED": "123"}
    )
    assert other.stdout.strip() == here, other.stderr
    params = builtin_parameters("python-code")
    assert params["num_files"] == len(files) and params["python_version"] == platform.python_version()


def test_python_code_split_never_shares_a_file(tmp_path, tok):
    """data.split gives each split a contiguous range of whole documents: since python-code is one
    document per file, no file is seen by both the train and the valid split."""
    from card_megatron.config import DataConfig
    from card_megatron.data.dataset import build_datasets

    sample = list(itertools.islice((d for d in builtin_documents("python-code") if len(d) < 6000), 40))
    inp = write_jsonl(tmp_path / "code.jsonl", [{"text": d} for d in sample])
    pp.preprocess(pp.PreprocessOptions(inputs=[inp], output_prefix=str(tmp_path / "code"), tokenizer_model=tok.source))
    prefix = str(tmp_path / "code_text_document")
    shard = TokenShard(prefix)
    file_of = [tok.decode(shard[d][:40]).split("\n")[0] for d in range(len(shard))]
    assert file_of == [d.split("\n")[0] for d in sample]
    L = 32
    sizes = np.asarray(shard.sequence_lengths)
    train_tokens, valid_tokens = int(sizes[:32].sum()), int(sizes[32:].sum())  # split 80,20,0 of 40 documents
    n = {"train": train_tokens // L, "valid": valid_tokens // L}
    data = build_datasets(DataConfig(data_path=prefix, split="80,20,0", cache_dir=str(tmp_path / "cache")), L, 1, n)
    seen = {}
    for split, ds in data.items():
        if not len(ds):
            continue
        docs, headers = set(), set()
        for k in range(len(ds)):
            d, s = ds.locate(k)
            bounds = ds.arrays[f"d{d}_sample_index"]
            docs.update(int(x) for x in ds.arrays[f"d{d}_document_index"][bounds[s, 0] : bounds[s + 1, 0] + 1])
            headers.update(re.findall(r"# file: \S+\.py(?=\n)", tok.decode(ds[k]["tokens"].tolist())))
        files = {file_of[x] for x in docs}
        assert len(files) == len(docs) and headers <= files  # the text agrees with the index
        seen[split] = files
    assert len(seen["train"]) >= 30 and len(seen["valid"]) >= 6
    assert seen["train"].isdisjoint(seen["valid"])


# -- the tool end to end -----------------------------------------------------------
def test_cli_end_to_end_workers(tmp_path, docs, tok_path, tok):
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        r = run_tool(
            "--input",
            inp,
            "--tokenizer-model",
            tok_path,
            "--output-prefix",
            out,
            "--workers",
            workers,
            "--log-interval",
            "0",
        )
        assert r.returncode == 0, r.stderr
        assert "tokens/s" in r.stderr and "docs/s" in r.stderr and "MB/s" in r.stderr and "ETA" in r.stderr
        assert "text: 200 documents" in r.stderr
        prefix = f"{out}_text_document"
        assert_shard(prefix, tok, docs)
        outs[workers] = open(prefix + ".bin", "rb").read() + open(prefix + ".idx", "rb").read()
        meta = json.load(open(f"{out}.tokenizer.json"))
        assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["mask_id"]) == (0, 2, 3, 4)
        assert meta["vocab_size"] == tok.vocab_size
        assert meta["inputs"] == [
            {
                "name": os.path.abspath(inp),
                "kind": "jsonl",
                "gzip": False,
                "size_bytes": os.path.getsize(inp),
                "num_lines": 200,
                "num_documents": {"text": 200},
                "sha256": hashlib.sha256(open(inp, "rb").read()).hexdigest(),
                "sha256_of": "file bytes",
            }
        ]
    assert outs[1] == outs[2]


def test_sidecar_records_builtin_and_file_inputs(tmp_path, tok):
    """A small synthetic-copy (spec given through the library) next to a gzip file without a final line end."""
    spec = SyntheticCopySpec(seed=3, num_documents=40)
    raw = b"first line\n\nthird line"
    with gzip.open(tmp_path / "f.txt.gz", "wb") as f:
        f.write(raw)
    inputs = [builtin_source("synthetic-copy", spec), str(tmp_path / "f.txt.gz")]
    stats = pp.preprocess(
        pp.PreprocessOptions(
            inputs=inputs, output_prefix=str(tmp_path / "s"), tokenizer_model=tok.source, workers=2, chunk_bytes=1000
        )
    )
    docs = list(synthetic_copy_documents(spec))
    assert_shard(str(tmp_path / "s_text_document"), tok, docs + ["first line", "third line"])
    meta = json.load(open(tmp_path / "s.tokenizer.json"))
    assert meta["inputs"] == stats.inputs and meta["mask_id"] == tok.mask_id
    assert meta["sha256"] == hashlib.sha256(open(tok.source, "rb").read()).hexdigest() == tok.sha256
    synthetic, text = meta["inputs"]
    assert synthetic == {
        "name": "builtin:synthetic-copy",
        "kind": "builtin",
        "num_lines": 40,
        "num_documents": {"text": 40},
        "sha256": fingerprint_documents(docs),
        "sha256_of": "documents",
        "parameters": {
            "seed": 3,
            "num_documents": 40,
            "lexicon_size": 256,
            "syllables_per_word": [2, 3],
            "words_per_string": [8, 8],
            "repeats": [6, 10],
            "consonants": "bdfgklmnprstvz",
            "vowels": "aeiou",
        },
    }
    assert text == {
        "name": str(tmp_path / "f.txt.gz"),
        "kind": "txt",
        "gzip": True,
        "size_bytes": os.path.getsize(tmp_path / "f.txt.gz"),
        "num_lines": 3,
        "num_documents": {"text": 2},
        "sha256": hashlib.sha256(raw).hexdigest(),
        "sha256_of": "file bytes",
    }
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with pytest.raises(ValueError, match="takes a SyntheticCopySpec"):
        builtin_source("synthetic-copy", {"seed": 1})
    with pytest.raises(ValueError, match="unknown built-in corpus 'builtin:nope'.*builtin:synthetic-copy"):
        pp.resolve_inputs(["builtin:nope"])


def test_small_chunks_many_workers_keep_order(tmp_path, docs, tok):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    opts = pp.PreprocessOptions(
        inputs=[inp], output_prefix=str(tmp_path / "o"), tokenizer_model=tok.source, workers=2, chunk_bytes=2000
    )
    stats = pp.preprocess(opts)
    assert stats.outputs["text"].num_documents == len(docs) and stats.num_lines == len(docs)
    assert_shard(str(tmp_path / "o_text_document"), tok, docs)


def test_txt_gzip_glob_and_keys(tmp_path, docs, tok_path, tok):
    lines = [d.replace("\n", " ") for d in docs[:40]]
    (tmp_path / "a.txt").write_text("\n".join(lines[:20]) + "\n\n")  # + an empty document
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n".join(lines[20:]))  # no final line end
    r = run_tool("--input", tmp_path / "*.txt*", "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert "1 empty documents" in r.stderr
    assert_shard(f"{tmp_path}/t_text_document", tok, lines)

    recs = [{"title": f"T{i}", "body": d} for i, d in enumerate(docs[:10])]
    inp = str(tmp_path / "k.jsonl.gz")
    with gzip.open(inp, "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in recs))
    r = run_tool(
        "--input",
        inp,
        "--json-keys",
        "title",
        "body",
        "--tokenizer-model",
        tok_path,
        "--output-prefix",
        tmp_path / "k",
        "--workers",
        2,
    )
    assert r.returncode == 0, r.stderr
    assert_shard(f"{tmp_path}/k_title_document", tok, [x["title"] for x in recs])
    assert_shard(f"{tmp_path}/k_body_document", tok, [x["body"] for x in recs])


def test_cli_train_tokenizer(tmp_path, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs[:100]])
    out = tmp_path / "tr"
    r = run_tool("--input", inp, "--train-tokenizer", "--vocab-size", 500, "--output-prefix", out, "--workers", 2)
    assert r.returncode == 0, r.stderr
    t = load_tokenizer(f"{out}.model")
    assert t.mask_id == 4 and t.vocab_size <= 500
    assert_shard(f"{out}_text_document", t, docs[:100])
    r = run_tool("--input", inp, "--train-tokenizer", "--vocab-size", 500, "--output-prefix", out)
    assert r.returncode != 0 and "already exists" in r.stderr
    r = run_tool("--input", inp, "--train-tokenizer", "--output-prefix", tmp_path / "nv")
    assert r.returncode != 0 and "--vocab-size" in r.stderr


# -- bad input -----------------------------------------------------------------------
def assert_user_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr, r.stderr


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"text": "unterminated', "invalid JSON"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
        (b'["a", "list"]', "expected a JSON object"),
        (b'{"text": 12}', "not a string"),
        (b'{"text": "\\ud800"}', "lone UTF-16 surrogate"),  # valid JSON, but no text
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok_path, bad_line, message):
    inp = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good one"}, {"text": "good two"}], [bad_line])
    out = tmp_path / "o"
    r = run_tool("--input", inp, "--tokenizer-model", tok_path, "--output-prefix", out, "--workers", 2)
    assert_user_error(r, f"{inp}:3:", message)
    assert not os.path.exists(f"{out}_text_document.bin") and not os.path.exists(f"{out}_text_document.idx")
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    r = run_tool("--input", inp, "--tokenizer-model", tok_path, "--output-prefix", out, "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    assert "skipped: 1 lines" in r.stderr
    assert len(TokenShard(f"{out}_text_document")) == 2


def test_bad_line_number_across_chunks(tmp_path, tok):
    good = [{"text": f"document number {i}"} for i in range(500)]
    inp = write_jsonl(tmp_path / "many.jsonl", good, [b"{oops"])
    opts = pp.PreprocessOptions(
        inputs=[inp], output_prefix=str(tmp_path / "o"), tokenizer_model=tok.source, workers=2, chunk_bytes=1000
    )
    with pytest.raises(pp.PreprocessError, match=r"many\.jsonl:501: invalid JSON"):
        pp.preprocess(opts)


def test_skip_counts_and_empty_documents(tmp_path, tok, docs):
    inp = write_jsonl(
        tmp_path / "mix.jsonl",
        [{"text": docs[0]}, {"text": "  "}, {"other": "x"}, {"text": docs[1]}],
        [b"", b"not json", b'{"text": "\xff"}'],
    )
    opts = pp.PreprocessOptions(
        inputs=[inp], output_prefix=str(tmp_path / "o"), tokenizer_model=tok.source, skip_bad_lines=True
    )
    stats = pp.preprocess(opts)
    assert stats.skipped == {
        "empty documents": 1,
        "lines with key 'text' missing": 1,
        "blank lines": 1,
        "lines with invalid JSON": 1,
        "lines with invalid UTF-8": 1,
    }
    assert stats.num_lines == 7 and stats.outputs["text"].num_documents == 2
    assert_shard(str(tmp_path / "o_text_document"), tok, docs[:2])


def test_user_errors(tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}, {"body": "no text key"}])
    r = run_tool("--input", inp, "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "o")
    assert_user_error(r, f"{inp}:2:", "key 'text' is missing")
    r = run_tool("--input", inp, "--tokenizer-model", tmp_path / "missing.model", "--output-prefix", tmp_path / "o")
    assert_user_error(r, "tokenizer model not found", "missing.model")
    r = run_tool("--input", inp, "--output-prefix", tmp_path / "o")
    assert_user_error(r, "no tokenizer")
    r = run_tool(
        "--input", tmp_path / "nothing*.jsonl", "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "o"
    )
    assert_user_error(r, "no file matches")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    assert run_tool("--input", ok, "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "o").returncode == 0
    before = open(tmp_path / "o_text_document.bin", "rb").read()
    r = run_tool("--input", ok, "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "o")
    assert_user_error(r, "already exists", "--overwrite")
    assert open(tmp_path / "o_text_document.bin", "rb").read() == before
    r = run_tool("--input", ok, "--tokenizer-model", tok_path, "--output-prefix", tmp_path / "o", "--overwrite")
    assert r.returncode == 0, r.stderr
    r = run_tool("--help")
    assert r.returncode == 0 and all(
        f in r.stdout
        for f in (
            "--input",
            "--json-keys",
            "--output-prefix",
            "--workers",
            "--overwrite",
            "--merge",
            "--skip-bad-lines",
        )
    )


def test_second_run_on_one_output_prefix_is_refused(tmp_path, tok):
    """{output_prefix}.lock is held for the whole run: a second run is refused, naming the holder (issue 14)."""
    from card_megatron.lock import ExclusiveLock

    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    opts = pp.PreprocessOptions(inputs=[inp], output_prefix=str(tmp_path / "o"), tokenizer_model=tok.source)
    with ExclusiveLock(str(tmp_path / "o.lock")):
        with pytest.raises(
            pp.PreprocessError, match=rf"o\.lock is locked by host .* pid {os.getpid()} since .*--output-prefix"
        ):
            pp.preprocess(opts)
    assert not os.path.exists(tmp_path / "o_text_document.bin")
    pp.preprocess(opts)  # released: the leftover lock file does not block
    assert os.path.exists(tmp_path / "o_text_document.bin")


def test_failed_run_leaves_no_tokenizer_and_says_disk_full(tmp_path, docs, monkeypatch):
    """A trained tokenizer is renamed into place only with its shards: a run that fails later (here: the
    disk fills at the end) leaves no {prefix}.model, says so, and the rerun works (issue 14)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs[:100]])
    opts = pp.PreprocessOptions(inputs=[inp], output_prefix=str(tmp_path / "tr"), train_tokenizer=True, vocab_size=500)
    real = pp.ShardWriter.finalize

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.prefix + ".bin")

    monkeypatch.setattr(pp.ShardWriter, "finalize", full)
    with pytest.raises(
        pp.PreprocessError,
        match=r"cannot write .*tr_text_document\.bin: No space left on device \(the disk is full\); no output written",
    ):
        pp.preprocess(opts)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tr.lock"]
    monkeypatch.setattr(pp.ShardWriter, "finalize", real)
    # A SIGKILLed run's temporaries are removed by the next run on the prefix.
    dead = [tmp_path / "tr_text_document.bin.99999.tmp", tmp_path / "tr.model.99999.tmp"]
    for d in dead:
        d.write_bytes(b"partial")
    pp.preprocess(opts)
    assert not any(d.exists() for d in dead)
    assert os.path.exists(tmp_path / "tr.model") and [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("victim", ["o_text_document.bin", "o.tokenizer.json", "m.idx"])
def test_real_full_disk_is_named_without_traceback(tmp_path, tok_path, docs, victim):
    """A real ENOSPC: the run's temporary file for VICTIM is a link to /dev/full. The C++ shard writer
    (.bin; the .idx of --merge) and the sidecar's writer say "No space left on device" naming the
    output, on one line, and leave nothing but the lock (the shards already in place when the sidecar
    fails are removed again). Issue 21."""
    from card_megatron.data.shards import ShardWriter

    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs[:30]])
    if victim.startswith("m"):
        with ShardWriter(str(tmp_path / "part"), vocab_size=600) as w:
            w.add_document(np.arange(20))
        args = ["--merge", str(tmp_path / "part"), "--output-prefix", str(tmp_path / "m")]
    else:
        args = ["--input", inp, "--tokenizer-model", tok_path, "--output-prefix", str(tmp_path / "o"), "--workers", "1"]
    link = "import os, runpy, sys; os.symlink('/dev/full', f'{sys.argv.pop(1)}.{os.getpid()}.tmp'); "
    run = "sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"
    r = subprocess.run(
        [sys.executable, "-c", link + run, str(tmp_path / victim), TOOL, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    message = f"error: cannot write {tmp_path / victim}: No space left on device (the disk is full); no output written"
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    left = sorted(os.listdir(tmp_path))
    assert left == (["in.jsonl", "part.bin", "part.idx"] if victim.startswith("m") else ["in.jsonl", "o.lock"])


# -- interruption ----------------------------------------------------------------------
def test_exception_mid_run_leaves_nothing(tmp_path, tok, docs, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    real = pp.iter_chunks

    def failing(source, chunk_bytes, **kw):
        for i, c in enumerate(real(source, chunk_bytes, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield c

    monkeypatch.setattr(pp, "iter_chunks", failing)
    for workers in (1, 2):
        opts = pp.PreprocessOptions(
            inputs=[inp],
            output_prefix=str(tmp_path / "o"),
            tokenizer_model=tok.source,
            workers=workers,
            chunk_bytes=4000,
        )
        with pytest.raises(KeyboardInterrupt):
            pp.preprocess(opts)
        left = [p for p in os.listdir(tmp_path) if p.startswith("o_")]
        assert left == [], left


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to look for orphaned workers")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_finished_shard(tmp_path, tok_path, sig):
    fifo = str(tmp_path / "stream.jsonl")
    os.mkfifo(fifo)  # the tool blocks reading it: the run is certainly unfinished when killed
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            TOOL,
            "--input",
            fifo,
            "--tokenizer-model",
            tok_path,
            "--output-prefix",
            str(out),
            "--workers",
            "2",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open(fifo, "w") as w:
            w.write(json.dumps({"text": "some text"}) + "\n")
            w.flush()
            deadline = time.monotonic() + 60
            while not any(".tmp" in p for p in os.listdir(tmp_path)):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            # Let the tool go back to waiting for input: a signal that lands between two system
            # calls of a blocking read is only handled once the read returns (CPython's handlers
            # run between bytecodes), which a real producer's next line or EOF would bring.
            time.sleep(0.5)
            proc.send_signal(sig)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not os.path.exists(f"{out}_text_document.bin") and not os.path.exists(f"{out}_text_document.idx")
    # no worker outlives the main process, even one killed by SIGKILL
    deadline = time.monotonic() + 30
    while (left := _processes_mentioning(str(out))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # don't leave them running if this fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"orphaned worker processes: {left}"
    if sig == signal.SIGTERM:  # a catchable signal: the temporaries are cleaned up too
        assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


# -- merge ------------------------------------------------------------------------------
def test_cli_merge(tmp_path, tok_path, tok, docs):
    parts = [docs[:30], docs[30:50]]
    prefixes = []
    for k, part in enumerate(parts):
        inp = write_jsonl(tmp_path / f"p{k}.jsonl", [{"text": d} for d in part])
        assert (
            run_tool("--input", inp, "--tokenizer-model", tok_path, "--output-prefix", tmp_path / f"p{k}").returncode
            == 0
        )
        prefixes.append(f"{tmp_path}/p{k}_text_document")
    r = run_tool("--merge", *prefixes, "--output-prefix", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert_shard(f"{tmp_path}/merged", tok, docs[:50])
    r = run_tool("--merge", *prefixes, "--output-prefix", tmp_path / "merged")
    assert_user_error(r, "already exists")
    r = run_tool("--merge", prefixes[0], str(tmp_path / "nope"), "--output-prefix", tmp_path / "m2")
    assert_user_error(r, "not found")


def test_chunks_cover_the_file_at_line_ends(tmp_path):
    from card_megatron.data.corpus import InputSource, iter_chunks

    rng = np.random.default_rng(0)
    lines = [b"x" * int(n) for n in rng.integers(0, 300, size=400)]
    data = b"\n".join(lines)  # no final line end
    (tmp_path / "f.txt").write_bytes(data)
    with gzip.open(tmp_path / "f.txt.gz", "wb") as f:
        f.write(data)
    for name, gz in (("f.txt", False), ("f.txt.gz", True)):
        for chunk_bytes in (100, 1000, 1 << 20):
            chunks = list(iter_chunks(InputSource(str(tmp_path / name), "txt", gz), chunk_bytes))
            parts = [c.data() for c in chunks]
            assert all(p.endswith(b"\n") for p in parts)
            assert b"".join(parts) == data + b"\n"
            assert chunks[-1].input_pos == os.path.getsize(tmp_path / name)


def test_fast_parser_matches_line_by_line_reference():
    """The whole-chunk fast path must agree with the line-by-line parser or step aside (None)."""
    rng = np.random.default_rng(7)
    good = [
        b'{"text": "plain"}',
        b'{"text": "caf\\u00e9 \\"q\\" \\n nl", "n": 1}',
        '{"text": "ünï ✓"}'.encode(),
        b'{"text": "  "}',
        b'{"text": ""}',
        b'{"text": "x", "body": "b"}',
        b'{"body": "y", "text": "z"}',
    ]
    odd = [
        b"",
        b"   ",
        b'  {"text": "padded"}  ',
        b'{"text": "crlf"}\r',
        b'{"text": 5}',
        b'{"text": null}',
        b'{"other": "k"}',
        b"[1, 2]",
        b'"just a string"',
        b"{bad json",
        b'{"text": "\xff"}',
        b'{"text": "a"}, {"text": "b"}',
        b'{"text": "ok"} trailing',
    ]
    agree = fallbacks = 0
    for trial in range(300):
        pool = good + (odd if trial % 2 else [])
        lines = [pool[i] for i in rng.integers(0, len(pool), size=rng.integers(1, 12))]
        data = b"\n".join(lines) + b"\n"
        for kind, keys in (("jsonl", ("text",)), ("jsonl", ("text", "body")), ("txt", ("text",))):
            ref_texts, ref_skipped, ref_lines, ref_error = readers._parse_lines(data, kind, keys, True)
            fast = readers._parse_clean_chunk(data, kind, keys)
            if fast is None:
                fallbacks += 1
                continue
            assert fast == (ref_texts, ref_skipped, ref_lines), (kind, keys, lines)
            agree += 1
    assert agree > 100 and fallbacks > 100


def test_existing_file_with_glob_characters_is_a_file(tmp_path):
    """x[1].jsonl is that file, not the pattern matching x1.jsonl."""
    (tmp_path / "x[1].jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "x1.jsonl").write_text('{"text": "b"}\n')
    assert [s.name for s in pp.resolve_inputs([str(tmp_path / "x[1].jsonl")])] == [str(tmp_path / "x[1].jsonl")]
    assert [s.name for s in pp.resolve_inputs([str(tmp_path / "x[0-9].jsonl")])] == [str(tmp_path / "x1.jsonl")]
