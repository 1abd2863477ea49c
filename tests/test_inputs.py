"""Parquet (FineWeb layout) and zstd-compressed JSONL inputs of tools/preprocess_data.py."""

import hashlib
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from card_megatron.data import preprocess as pp
from card_megatron.data.corpus import builtin_documents
from card_megatron.data.shards import TokenShard
from card_megatron.tokenizers import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def docs():
    return list(itertools.islice(builtin_documents(), 120))


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs):
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=500)


def fineweb_table(texts):
    """FineWeb's columns (text, id, dump, url, date, language, language_score, token_count)."""
    n = len(texts)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "date": ["2024-02-21T00:00:00Z"] * n,
            "language": ["en"] * n,
            "language_score": np.linspace(0.6, 1.0, n),
            "token_count": pa.array(np.arange(n), pa.int64()),
        }
    )


def shard_docs(prefix):
    s = TokenShard(prefix)
    return [s[i].tolist() for i in range(len(s))]


def expected(tok, texts):
    return [tok.encode(t) + [tok.eos_id] for t in texts if t and not t.isspace()]


def run(tmp_path, inputs, tok, name="o", **kw):
    opts = pp.PreprocessOptions(
        inputs=inputs, output_prefix=str(tmp_path / name), tokenizer_model=tok.source, log_interval=0.0, **kw
    )
    return pp.preprocess(opts)


def only_lock_left(tmp_path, name="o"):
    return [p for p in os.listdir(tmp_path) if p.startswith(name)] == [f"{name}.lock"]


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_fineweb_layout_row_groups(tmp_path, tok, docs, workers):
    path = tmp_path / "000_00000.parquet"
    pq.write_table(fineweb_table(docs), path, row_group_size=17, compression="snappy")
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    stats = run(tmp_path, [str(path)], tok, workers=workers)
    assert shard_docs(str(tmp_path / "o_text_document")) == expected(tok, docs)
    rec = json.load(open(tmp_path / "o.tokenizer.json"))["inputs"][0]
    assert rec["kind"] == "parquet" and rec["num_lines"] == len(docs) == stats.num_lines
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["sha256_of"] == "file bytes"


def test_parquet_two_columns_and_globs(tmp_path, tok, docs):
    for i in range(2):
        t = fineweb_table(docs[i * 30 : (i + 1) * 30]).append_column("body", pa.array(docs[60 + i * 30 : 90 + i * 30]))
        pq.write_table(t, tmp_path / f"part{i}.parquet", row_group_size=11)
    run(tmp_path, [str(tmp_path / "part*.parquet")], tok, json_keys=("text", "url"))
    assert shard_docs(str(tmp_path / "o_text_document")) == expected(tok, docs[:60])
    urls = [f"https://example.org/{i}" for i in range(30)] * 2
    assert shard_docs(str(tmp_path / "o_url_document")) == expected(tok, urls)


def test_parquet_null_row_named_or_skipped(tmp_path, tok, docs):
    texts = list(docs[:40])
    texts[25] = None  # row group 2 (rows 20..29), row 5
    path = tmp_path / "n.parquet"
    pq.write_table(fineweb_table(texts), path, row_group_size=10)
    with pytest.raises(
        pp.PreprocessError,
        match=r"n\.parquet: row group 2, row 5 \(row 26 of the file\): "
        r"column 'text' is null",
    ):
        run(tmp_path, [str(path)], tok, workers=2)
    assert only_lock_left(tmp_path)
    stats = run(tmp_path, [str(path)], tok, skip_bad_lines=True)
    assert stats.skipped["rows with 'text' null"] == 1
    assert shard_docs(str(tmp_path / "o_text_document")) == expected(tok, texts[:25] + texts[26:])


def test_parquet_bad_files(tmp_path, tok, docs):
    good = tmp_path / "good.parquet"
    pq.write_table(fineweb_table(docs[:40]), good, row_group_size=10, compression="none")
    # not Parquet at all / truncated footer
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + os.urandom(300))
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:-100])
    for name in ("junk.parquet", "cut.parquet"):
        with pytest.raises(ValueError, match=f"input .*{name}: not a readable Parquet file"):
            run(tmp_path, [str(tmp_path / name)], tok)
        assert only_lock_left(tmp_path)
    # a missing column, and a column that is not text
    with pytest.raises(pp.PreprocessError, match=r"no column 'body' \(columns: text, id, dump, url"):
        run(tmp_path, [str(good)], tok, json_keys=("body",))
    with pytest.raises(pp.PreprocessError, match=r"column 'token_count' holds int64, not strings"):
        run(tmp_path, [str(good)], tok, json_keys=("token_count",))
    # a damaged page in row group 2: the footer is fine, that row group is not
    data = bytearray(good.read_bytes())
    col = pq.ParquetFile(good).metadata.row_group(2).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start : start + 64] = b"\xff" * 64
    bad = tmp_path / "page.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(pp.PreprocessError, match=r"page\.parquet: row group 2 cannot be read"):
        run(tmp_path, [str(bad)], tok, workers=2)
    assert only_lock_left(tmp_path)


def test_parquet_duplicate_column_named_and_dictionary_strings_read(tmp_path, tok, docs):
    """Two columns named 'text': the file and the column are named, no KeyError from the worker; a
    dictionary-encoded string column (repeated values stored once) is read, nulls still named (issue 21)."""
    dup = pa.Table.from_arrays(
        [pa.array(docs[:10]), pa.array(docs[10:20]), pa.array(["u"] * 10)], ["text", "text", "url"]
    )
    pq.write_table(dup, tmp_path / "dup.parquet")
    for workers in (1, 2):
        with pytest.raises(
            pp.PreprocessError, match=r"dup\.parquet: 2 columns are named 'text' \(columns: text, text, url\)"
        ):
            run(tmp_path, [str(tmp_path / "dup.parquet")], tok, workers=workers)
        assert only_lock_left(tmp_path)
    run(tmp_path, [str(tmp_path / "dup.parquet")], tok, json_keys=("url",))  # the other columns are fine
    texts = [docs[i % 7] for i in range(30)]  # few distinct values: what dictionary encoding is for
    table = pa.table({"text": pa.array(texts).dictionary_encode(), "id": pa.array(range(30))})
    assert pa.types.is_dictionary(table.schema.field("text").type)
    pq.write_table(table, tmp_path / "dict.parquet", row_group_size=8)
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "dict.parquet").schema_arrow.field("text").type)
    run(tmp_path, [str(tmp_path / "dict.parquet")], tok, name="d", workers=2)
    assert shard_docs(str(tmp_path / "d_text_document")) == expected(tok, texts)
    texts[11] = None
    pq.write_table(
        pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "dnull.parquet", row_group_size=8
    )
    with pytest.raises(
        pp.PreprocessError, match=r"dnull\.parquet: row group 1, row 3 \(row 12 of the file\): column 'text' is null"
    ):
        run(tmp_path, [str(tmp_path / "dnull.parquet")], tok, name="dn")
    with pytest.raises(pp.PreprocessError, match=r"column 'id' holds int64, not strings"):
        run(tmp_path, [str(tmp_path / "dict.parquet")], tok, name="di", json_keys=("id",))


def write_zst(path, data: bytes, frames=1):
    c = zstandard.ZstdCompressor(level=3)
    step = -(-len(data) // frames)
    with open(path, "wb") as f:
        for i in range(frames):  # concatenated frames, as some datasets ship
            f.write(c.compress(data[i * step : (i + 1) * step]))


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_zst_equals_plain(tmp_path, tok, docs, workers):
    raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    (tmp_path / "a.jsonl").write_bytes(raw)
    write_zst(tmp_path / "a.jsonl.zst", raw, frames=3)
    run(tmp_path, [str(tmp_path / "a.jsonl")], tok, name="plain", workers=workers)
    run(tmp_path, [str(tmp_path / "a.jsonl.zst")], tok, name="zst", workers=workers, chunk_bytes=5000)
    assert shard_docs(str(tmp_path / "zst_text_document")) == shard_docs(str(tmp_path / "plain_text_document"))
    rec = json.load(open(tmp_path / "zst.tokenizer.json"))["inputs"][0]
    assert rec["zstd"] is True and rec["sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec["size_bytes"] == os.path.getsize(tmp_path / "a.jsonl.zst")


def test_jsonl_zst_errors(tmp_path, tok, docs):
    raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs[:30]) + b"{oops\n"
    write_zst(tmp_path / "b.jsonl.zst", raw)
    with pytest.raises(pp.PreprocessError, match=r"b\.jsonl\.zst:31: invalid JSON"):
        run(tmp_path, [str(tmp_path / "b.jsonl.zst")], tok)
    stats = run(tmp_path, [str(tmp_path / "b.jsonl.zst")], tok, skip_bad_lines=True)
    assert stats.skipped["lines with invalid JSON"] == 1
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))  # zstd magic, then garbage
    with pytest.raises(ValueError, match=r"c\.jsonl\.zst: cannot read \(not valid zstd"):
        run(tmp_path, [str(tmp_path / "c.jsonl.zst")], tok, name="out_c")
    assert only_lock_left(tmp_path, "out_c")


@pytest.mark.parametrize("name", ["t.txt.zst", "j.jsonl.zst", "m.jsonl.zst", "g.jsonl.gz"])
def test_truncated_compressed_input_is_refused(tmp_path, tok, docs, name):
    """A .zst (one frame, or the second of three) or .gz cut at 60% is refused naming the file, with and
    without --skip-bad-lines: no shard from the part before the cut (issue 21)."""
    if name.startswith("t"):
        raw = "".join(d.replace("\n", " ") + "\n" for d in docs).encode()
    else:
        raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    path = tmp_path / name
    if name.endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(raw))
    else:
        write_zst(path, raw, frames=3 if name.startswith("m") else 1)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 6 // 10])
    what = "not valid gzip" if name.endswith(".gz") else "truncated zstd: the file ends inside a frame"
    for skip in (False, True):
        with pytest.raises(ValueError, match=rf"input .*{name.replace('.', '[.]')}: cannot read \({what}"):
            run(tmp_path, [str(path)], tok, skip_bad_lines=skip, chunk_bytes=4000)
        assert only_lock_left(tmp_path)


def test_concatenated_zst_frames_with_a_skippable_frame_read_whole(tmp_path, tok, docs):
    raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs[:40])
    c = zstandard.ZstdCompressor(level=3, write_checksum=True)
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"meta!"
    (tmp_path / "s.jsonl.zst").write_bytes(c.compress(raw[:999]) + skippable + c.compress(raw[999:]))
    run(tmp_path, [str(tmp_path / "s.jsonl.zst")], tok)
    assert shard_docs(str(tmp_path / "o_text_document")) == expected(tok, docs[:40])


def test_line_chunker_joins_each_byte_once():
    """A line spanning many blocks is joined once (the old reader copied the carried part at every
    block: 128 MB in 1 MB blocks copied ~8 GB). Counted through the chunker's join, not timed."""
    from card_megatron.data.corpus import LineChunker

    def run_chunker(line_bytes, block=1000):
        joined = []

        def counting_join(parts):
            joined.append(sum(map(len, parts)))
            return b"".join(parts)

        data = b"short\n" + b"x" * line_bytes + b"\nend\n"
        chunker = LineChunker(chunk_bytes=100, max_line_bytes=1 << 30, join=counting_join)
        out = [p for p in (chunker.feed(data[i : i + block]) for i in range(0, len(data), block)) if p]
        assert chunker.finish() == b""  # the data ends with a line end: nothing left over
        assert b"".join(out) == data and all(p.endswith(b"\n") for p in out)
        return sum(joined)

    small, large = run_chunker(100_000), run_chunker(400_000)
    assert 100_000 <= small <= 2 * 100_010 and 400_000 <= large <= 2 * 400_010
    assert large < 5 * small  # linear: 4x the line, ~4x the bytes joined (quadratic would be 16x)


@pytest.mark.parametrize("name", ["l.jsonl", "l.jsonl.zst", "l.txt.gz"])
def test_line_longer_than_max_line_bytes_is_named(tmp_path, tok, docs, name):
    """Line 3 holds 600 kB: with --max-line-bytes 5000 the run stops there naming file and line, also
    with --skip-bad-lines, and the reader stops at the line instead of buffering all of it (issue 21)."""
    from card_megatron.data.corpus import iter_chunks

    long = "".join(np.random.default_rng(0).choice(list("abcdefghij "), 600_000))  # hardly compressible
    if name.endswith(".txt.gz"):
        lines = [docs[0].replace("\n", " "), docs[1].replace("\n", " "), long, docs[2].replace("\n", " ")]
    else:
        lines = [json.dumps({"text": t}) for t in (docs[0], docs[1], long, docs[2])]
    raw = "\n".join(lines).encode() + b"\n"
    path = tmp_path / name
    if name.endswith(".zst"):
        write_zst(path, raw)
    elif name.endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    for skip in (False, True):
        where = name.replace(".", "[.]")
        with pytest.raises(pp.PreprocessError, match=rf"{where}:3: line longer than --max-line-bytes \(5,000 bytes\)"):
            run(tmp_path, [str(path)], tok, skip_bad_lines=skip, max_line_bytes=5000, chunk_bytes=1000)
        assert only_lock_left(tmp_path)
    src = pp.resolve_inputs([str(path)])[0]
    read = sum(c.length for c in iter_chunks(src, chunk_bytes=1000, max_line_bytes=5000))
    assert read < 300_000  # stopped past 5,000 bytes into the long line (zstd: within a 128 kB block)
    run(tmp_path, [str(path)], tok, max_line_bytes=700_000)  # a bound above the line: read whole
    assert len(shard_docs(str(tmp_path / "o_text_document"))) == 4
    with pytest.raises(pp.PreprocessError, match=r"--max-line-bytes \(0\) must be at least 1"):
        run(tmp_path, [str(path)], tok, max_line_bytes=0, overwrite=True)


def test_cli_parquet_help_and_error(tmp_path, tok):
    help_text = subprocess.run(
        [sys.executable, TOOL, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=60,
    ).stdout
    assert ".parquet" in help_text and ".zst" in help_text and "HuggingFaceTokenizer" in help_text
    assert "--max-line-bytes N" in help_text and "256 MiB" in help_text
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    r = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            str(tmp_path / "x.parquet"),
            "--tokenizer-model",
            tok.source,
            "--output-prefix",
            str(tmp_path / "o"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=60,
    )
    assert r.returncode == 1 and "x.parquet: not a readable Parquet file" in r.stderr and "Traceback" not in r.stderr


def test_progress_bar_on_a_terminal_and_lines_elsewhere(capsys, caplog):
    import logging

    from card_megatron.data.progress import Progress

    bar = Progress(4000, interval=0.0, bar=True)
    for i in range(1, 5):
        bar.update(docs=10, tokens=500, text_bytes=1000, disk_pos=1000 * i)
    bar.close()
    err = capsys.readouterr().err
    assert "preprocess: 100%" in err and "40 docs" in err and "tokens/s" in err and "<" in err  # tqdm's ETA
    caplog.set_level(logging.INFO, logger="card_megatron.data.progress")
    lines = Progress(4000, interval=0.0, bar=False)
    lines.update(docs=10, tokens=500, text_bytes=1000, disk_pos=1000)
    assert "25.0% done, ETA" in caplog.text and "10 docs" in caplog.text
    assert Progress(4000, interval=2.0).bar is None  # pytest's stderr is not a terminal


def test_large_row_group_warns(tmp_path, tok, docs, monkeypatch, caplog):
    from card_megatron.data import corpus

    path = tmp_path / "one.parquet"
    pq.write_table(fineweb_table(docs[:40]), path)  # one row group
    monkeypatch.setattr(corpus, "LARGE_ROW_GROUP_BYTES", 1000)
    run(tmp_path, [str(path)], tok)
    assert "one.parquet: a row group holds" in caplog.text and "row_group_size" in caplog.text
