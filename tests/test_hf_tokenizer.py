"""Hugging Face tokenizer.json tokenizers: reserved ids, bad files, preprocessing, int32 shards."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from card_megatron.data import preprocess as pp
from card_megatron.data.corpus import builtin_documents
from card_megatron.data.shards import TokenShard
from card_megatron.tokenizers import HuggingFaceTokenizer, load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
ENV = {**os.environ, "PYTHONPATH": ROOT}


def train_bpe(docs, path, vocab_size=700, special=("<|endoftext|>",)):
    """A byte-level BPE tokenizer.json trained by the tokenizers library itself (GPT-2's recipe)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def docs():
    return list(itertools.islice(builtin_documents(), 150))


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, docs):
    return train_bpe(docs, tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_reserved_ids_appended_reproducibly(bpe_path, docs):
    tok = load_tokenizer(bpe_path)
    assert isinstance(tok, HuggingFaceTokenizer)
    raw = HFTokenizer.from_file(bpe_path)
    n = raw.get_vocab_size(with_added_tokens=True)
    # eos is the tokenizer's own <|endoftext|>; <mask>, <s>, <pad> come after the vocabulary in that order
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") and tok.num_pieces == n
    assert (tok.mask_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (n, n + 1, n + 2, n + 3)
    assert tok.appended == ("mask", "bos", "pad")
    again = load_tokenizer(bpe_path)
    assert again.hf_json() == tok.hf_json() and again.sha256 == tok.sha256 and again.metadata() == tok.metadata()
    exported = HFTokenizer.from_str(tok.hf_json())  # the added tokens travel with the exported file
    assert [exported.token_to_id(t) for t in ("<mask>", "<s>", "<pad>")] == [n, n + 1, n + 2]
    # text never produces a reserved id, even when it spells one out; the rest round-trips
    text = docs[3][:300] + " <mask> <|endoftext|> <s>"
    ids = tok.encode(text)
    assert not {tok.mask_id, tok.eos_id, tok.bos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text
    batch = tok.encode_batch([docs[0], docs[1]], add_eos=True)
    assert [b.tolist() for b in batch] == [tok.encode(docs[0]) + [tok.eos_id], tok.encode(docs[1]) + [tok.eos_id]]
    # a tokenizer that has <mask> keeps its id
    with_mask = load_tokenizer(
        train_bpe(
            docs[:50],
            os.path.join(os.path.dirname(bpe_path), "m.json"),
            400,
            special=("<pad>", "<s>", "</s>", "<mask>"),
        )
    )
    assert (with_mask.pad_id, with_mask.bos_id, with_mask.eos_id, with_mask.mask_id) == (0, 1, 2, 3)
    assert with_mask.appended == () and with_mask.vocab_size == with_mask.num_pieces


def test_text_never_makes_a_reserved_id(tmp_path, bpe_path, docs):
    """<mask>, </s>, <s> as ordinary vocabulary words and <pad> as a non-special added token are text:
    they are not adopted (issue 21: a shard held 50 mask ids); new special tokens are appended, named
    so as not to clash. A special added token ([PAD]) is adopted."""
    hf = HFTokenizer(
        models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "<mask>": 3, "</s>": 4, "<s>": 5}, unk_token="<unk>")
    )
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_tokens([AddedToken("<pad>", special=False)])  # id 6
    hf.add_special_tokens([AddedToken("[PAD]", special=True)])  # id 7
    hf.save(str(tmp_path / "words.json"))
    tok = load_tokenizer(str(tmp_path / "words.json"))
    assert tok.pad_id == 7 and (tok.mask_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (8, 9, 10, 11)
    assert tok.appended == ("mask", "eos", "bos")
    exported = HFTokenizer.from_str(tok.hf_json())
    names = ("<card_megatron_mask>", "<card_megatron_eos>", "<card_megatron_bos>")
    assert [exported.token_to_id(n) for n in names] == [8, 9, 10]
    reserved = {tok.mask_id, tok.eos_id, tok.bos_id, tok.pad_id}
    assert tok.encode("hello <mask> world </s>") == [1, 3, 2, 4] and tok.encode("<s> <pad> [PAD]") == [5, 6, 0]

    # a byte-level BPE whose <mask> is an added token with "special": false
    spec = json.loads(open(bpe_path).read())
    spec["added_tokens"].append(
        {**spec["added_tokens"][0], "id": spec["model"]["vocab"].__len__(), "content": "<mask>"}
    )
    spec["added_tokens"][-1]["special"] = False
    (tmp_path / "bpe_mask.json").write_text(json.dumps(spec))
    bpe = load_tokenizer(str(tmp_path / "bpe_mask.json"))
    assert bpe.appended[0] == "mask" and bpe.mask_id == bpe.num_pieces
    text = "hello <mask> world </s> <s> <|endoftext|>"
    assert not {bpe.mask_id, bpe.eos_id, bpe.bos_id, bpe.pad_id} & set(bpe.encode(text))
    assert bpe.decode(bpe.encode(text)) == text

    # preprocessing: documents that spell the reserved names hold none of their ids
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": f"hello <mask> world </s> {i}"}) + "\n" for i in range(50))
    )
    pp.preprocess(
        pp.PreprocessOptions(
            inputs=[str(tmp_path / "in.jsonl")],
            output_prefix=str(tmp_path / "w"),
            tokenizer_model=str(tmp_path / "words.json"),
        )
    )
    tokens = TokenShard(str(tmp_path / "w_text_document")).tokens
    assert len(tokens) == 50 * 6 and set(tokens.tolist()) == {0, 1, 2, 3, 4, tok.eos_id}
    assert (tokens == tok.eos_id).sum() == 50 and not (reserved - {tok.eos_id}) & set(tokens.tolist())
    # a shard made when this file's words were adopted (the same sha256, other reserved ids) is refused
    from card_megatron.eval.perplexity import check_shard_tokenizer

    side = json.load(open(tmp_path / "w.tokenizer.json"))
    check_shard_tokenizer(str(tmp_path / "w_text_document"), tok)
    (tmp_path / "w.tokenizer.json").write_text(json.dumps({**side, "mask_id": 3, "eos_id": 4}))
    with pytest.raises(
        ValueError, match=r"w_text_document was tokenized with the reserved ids .*'mask_id': 3.*re-tokenize"
    ):
        check_shard_tokenizer(str(tmp_path / "w_text_document"), tok)


def test_bad_tokenizer_json_is_a_clear_error(tmp_path, bpe_path, docs):
    text = open(bpe_path).read()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    (tmp_path / "foreign.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    for name in ("cut.json", "foreign.json"):
        with pytest.raises(ValueError, match=f"{name} is not a valid Hugging Face tokenizer.json"):
            load_tokenizer(str(tmp_path / name))
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
        r = subprocess.run(
            [
                sys.executable,
                TOOL,
                "--input",
                str(tmp_path / "in.jsonl"),
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                str(tmp_path / name),
                "--output-prefix",
                str(tmp_path / "out"),
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert r.returncode == 1 and "not a valid Hugging Face tokenizer.json" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert [p for p in os.listdir(tmp_path) if p.startswith("out")] in ([], ["out.lock"])
    sp = train_tokenizer(docs, str(tmp_path / "sp.model"), 400)
    with pytest.raises(ValueError, match="--tokenizer-type HuggingFaceTokenizer, but .*sp.model is a SentencePiece"):
        load_tokenizer(sp.source, "HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type SentencePieceTokenizer, but .* is a Hugging Face"):
        load_tokenizer(bpe_path, "SentencePieceTokenizer")


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_with_tokenizer_json(tmp_path, bpe_path, docs, workers):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            str(tmp_path / "in.jsonl"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            bpe_path,
            "--output-prefix",
            str(tmp_path / "o"),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(bpe_path)
    shard = TokenShard(str(tmp_path / "o_text_document"))
    assert shard.dtype == np.uint16
    assert [shard[i].tolist() for i in range(len(shard))] == [tok.encode(d) + [tok.eos_id] for d in docs]
    side = json.load(open(tmp_path / "o.tokenizer.json"))
    assert side["kind"] == "huggingface" and side["sha256"] == tok.sha256 and side["mask_id"] == tok.mask_id


def test_vocabulary_over_65535_is_stored_as_int32(tmp_path):
    """A 70,000-word vocabulary: the shard holds int32 ids above 65,535, read back the same by
    Megatron's own IndexedDataset and by the training dataset's reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    words = [f"w{i}" for i in range(70_000)]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "big.json"))
    rng = np.random.default_rng(0)
    texts = [" ".join(words[j] for j in rng.integers(0, 70_000, size=int(rng.integers(1, 30)))) for _ in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stats = pp.preprocess(
        pp.PreprocessOptions(
            inputs=[str(tmp_path / "in.jsonl")],
            output_prefix=str(tmp_path / "big"),
            tokenizer_model=str(tmp_path / "big.json"),
            workers=2,
        )
    )
    tok = load_tokenizer(str(tmp_path / "big.json"))
    assert tok.vocab_size == 70_005 and stats.outputs["text"].dtype == np.int32
    expect = [[int(w[1:]) for w in t.split()] + [tok.eos_id] for t in texts]
    assert max(max(e) for e in expect) > 65_535
    ours = TokenShard(str(tmp_path / "big_text_document"))
    theirs = IndexedDataset(str(tmp_path / "big_text_document"))
    assert ours.dtype == np.int32 and theirs.index.dtype == np.int32
    assert [ours[i].tolist() for i in range(len(ours))] == expect == [theirs[i].tolist() for i in range(len(theirs))]
