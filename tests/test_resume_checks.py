"""What a resume refuses and what it allows (issue 21): crafted structures and mis-shaped tensors in
checkpoint files, other data or another tokenizer under the same paths, settings compared by what
they resolve to, and the keys that do not change the maths. Single-process Trainers, built in-process.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from card_megatron.training import checkpoint as ckpt
from tests.training_runs import REPO, overrides


def _config(corpus, run, *extra):
    from card_megatron.config import load_config

    return load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(corpus, run, 4, *extra))


def _trainer(corpus, run, *extra):
    from card_megatron.training.trainer import Trainer

    return Trainer(_config(corpus, run, *extra))


@pytest.fixture(scope="module")
def saved_run(tiny_corpus, tmp_path_factory):
    """A run directory with one checkpoint (step 1) of the tiny model; tests resume copies of it."""
    run = str(tmp_path_factory.mktemp("resume") / "run")
    trainer = _trainer(tiny_corpus, run)
    trainer.train_step()
    trainer.save()
    trainer.close()
    return run


def _copy_run(saved_run, tmp_path) -> tuple[str, str]:
    run = str(tmp_path / "run")
    shutil.copytree(saved_run, run)
    return run, os.path.join(run, "checkpoints", "step_00000001")


def _rewrite(checkpoint: str, name: str, state) -> str:
    """Replaces file ``name`` of ``checkpoint`` and fixes the manifest, as someone crafting it would."""
    file = os.path.join(checkpoint, name)
    torch.save(state, file)
    meta_path = os.path.join(checkpoint, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"][name] = os.path.getsize(file)
    json.dump(meta, open(meta_path, "w"))
    return file


MODEL_FILE = "mp_rank_00_model_states.pt"


def _shared_nest(depth: int) -> list:
    """A list that shares its child twice at every level: ``depth`` distinct lists, 2**depth when unfolded."""
    nest: list = []
    for _ in range(depth):
        nest = [nest, nest]
    return nest


# ------------------------------------------------------------------------------------ the checks alone


def test_structure_checks_refuse_sharing_cycles_depth_and_overlapping_tensors(tmp_path):
    path = str(tmp_path / "x.pt")
    ckpt.check_structure({"betas": (0.9, 0.95), "groups": [{"b": 1}, {"b": 2}]}, path)  # ordinary: passes
    shared = (0.9, 0.95)
    ckpt.check_structure([{"betas": shared}, {"betas": shared}], path)  # DeepSpeed shares betas: passes
    ckpt.check_structure({"ids": list(range(200_000)), "names": [str(i) for i in range(50_000)]}, path)  # big, flat
    with pytest.raises(ckpt.CheckpointContentError, match=r"refusing .*x\.pt: containers shared so often"):
        ckpt.check_structure({"state": _shared_nest(22)}, path)
    cyclic: list = [1]
    cyclic.append(cyclic)
    with pytest.raises(ckpt.CheckpointContentError, match=r"a container that contains itself at \[1\]"):
        ckpt.check_structure(cyclic, path)
    deep: list = []
    for _ in range(ckpt.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ckpt.CheckpointContentError, match=f"nested deeper than {ckpt.MAX_DEPTH} levels"):
        ckpt.check_structure(deep, path)
    overlapping = r"a non-contiguous tensor \(shape \(4, 3\), strides \(0, 0\)"
    with pytest.raises(ckpt.CheckpointContentError, match=overlapping):
        ckpt.check_structure({"w": torch.zeros(1).expand(4, 3)}, path)
    with pytest.raises(ckpt.CheckpointContentError, match="an object of type builtins.object"):
        ckpt.check_structure({"w": object()}, path)


def test_crafted_files_are_refused_naming_file_and_key(saved_run, tiny_corpus, tmp_path):
    """Through the engine's own loader (the one DeepSpeed calls on resume): a nested shared list in the
    optimizer state (FAIL 3: resume hung), a stride-0 tensor (FAIL 4: 64 GiB), a tensor of another shape
    or dtype than the model and optimizer need, a tensor with no place, a missing weight."""
    _, checkpoint = _copy_run(saved_run, tmp_path)
    original = torch.load(os.path.join(checkpoint, MODEL_FILE), weights_only=False)
    trainer = _trainer(tiny_corpus, str(tmp_path / "fresh"))
    load = trainer.engine.checkpoint_engine.load
    file = os.path.join(checkpoint, MODEL_FILE)
    assert set(load(file)["module"]) == set(original["module"])  # the genuine file passes
    emb = "embedding.embedding.word_embeddings.weight"
    shape = tuple(original["module"][emb].shape)

    def crafted(change):
        state = torch.load(file + ".orig" if os.path.exists(file + ".orig") else file, weights_only=False)
        change(state)
        if not os.path.exists(file + ".orig"):
            shutil.copyfile(file, file + ".orig")
        _rewrite(checkpoint, MODEL_FILE, state)
        with pytest.raises(ValueError) as e:
            load(file)
        assert f"refusing {file}: " in str(e.value)
        return str(e.value)

    text = crafted(lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", _shared_nest(22)))
    assert "containers shared so often" in text and "['optimizer']['state'][0]['exp_avg']" in text
    text = crafted(lambda s: s["module"].__setitem__(emb, torch.zeros(1).expand(*shape)))
    assert f"a non-contiguous tensor (shape {shape}, strides (0, 0)" in text and f"['module']['{emb}']" in text
    text = crafted(lambda s: s["module"].__setitem__(emb, torch.zeros(2**20, 64)))
    assert "a tensor of shape (1048576, 64) and dtype torch.float32 where the current model and optimizer" in text
    assert f"need shape {shape} and dtype torch.float32" in text
    text = crafted(lambda s: s["module"].__setitem__(emb, s["module"][emb].double()))
    assert "dtype torch.float64" in text and f"['module']['{emb}']" in text
    text = crafted(lambda s: s["optimizer"]["state"][1].__setitem__("exp_avg", torch.zeros(3, 3)))
    assert "a tensor of shape (3, 3)" in text and "['optimizer']['state'][1]['exp_avg']" in text
    text = crafted(lambda s: s["optimizer"]["state"].__setitem__(99, {"exp_avg": torch.zeros(5)}))
    assert "have no use for at ['optimizer']['state'][99]['exp_avg']" in text, text
    text = crafted(lambda s: s["module"].pop(emb))
    assert f"no tensor for {emb}" in text
    # Another model-parallel rank's file (DeepSpeed reads mp_rank_00 on every rank for its metadata; a
    # pipeline stage's shapes differ): structure checks only, its own rank compares the shapes.
    other = os.path.join(checkpoint, "mp_rank_01_model_states.pt")
    state = torch.load(file + ".orig", weights_only=False)
    state["module"][emb] = torch.zeros(7, 3)
    torch.save(state, other)
    assert tuple(load(other)["module"][emb].shape) == (7, 3)
    state["module"][emb] = torch.zeros(1).expand(7, 3)
    torch.save(state, other)
    with pytest.raises(ValueError, match="a non-contiguous tensor"):
        load(other)
    trainer.close()


def test_resume_refuses_a_crafted_checkpoint_before_using_it(saved_run, tiny_corpus, tmp_path):
    """End to end: the Trainer's resume refuses the nested shared list of FAIL 3 at once, naming the file."""
    run, checkpoint = _copy_run(saved_run, tmp_path)
    file = os.path.join(checkpoint, MODEL_FILE)
    state = torch.load(file, weights_only=False)
    state["optimizer"]["state"][0]["exp_avg"] = _shared_nest(22)
    _rewrite(checkpoint, MODEL_FILE, state)
    with pytest.raises(ValueError, match=f"refusing {file}: containers shared so often"):
        _trainer(tiny_corpus, run)


# ------------------------------------------------------------------------------------ data and tokenizer


def test_data_and_tokenizer_replaced_under_the_same_paths_are_refused(tiny_corpus, tmp_path):
    """FAIL 5: the checkpoint records the tokenizer's sha256 and the data's identity; other files under
    the same paths are refused with the differences, a copy of the same files is not."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from card_megatron.tokenizers import train_tokenizer

    src_prefix, src_tokenizer = tiny_corpus
    data = tmp_path / "data"
    data.mkdir()
    src = os.path.dirname(src_prefix)
    for f in os.listdir(src):
        if f.startswith("docs") and not f.endswith(".lock") and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), data / f)
    corpus = (str(data / os.path.basename(src_prefix)), str(data / os.path.basename(src_tokenizer)))
    run = str(tmp_path / "run")
    trainer = _trainer(corpus, run)
    trainer.train_step()
    checkpoint = trainer.save()
    trainer.close()
    meta = ckpt.saved_meta(checkpoint)
    assert meta["tokenizer_sha256"] == trainer.tokenizer.sha256 and corpus[0] in meta["data"]
    assert meta["resolved"] == {"train.precision": "fp32", "parallel.distributed_backend": "gloo"}

    # The same content rewritten (a copy: new inode and mtime) resumes.
    for f in (corpus[0] + ".bin", corpus[0] + ".idx", corpus[1]):
        shutil.copyfile(f, f + ".tmp")
        os.replace(f + ".tmp", f)
    _trainer(corpus, run).close()

    # Fewer documents under the same prefix (the same tokenizer): resumed silently before issue 21.
    from card_megatron.config import ConfigError

    docs = IndexedDataset(corpus[0])
    builder = IndexedDatasetBuilder(corpus[0] + ".bin.new", dtype=np.uint16)
    for i in range(len(docs) // 2):
        builder.add_document(np.asarray(docs[i], dtype=np.uint16), [len(docs[i])])
    builder.finalize(corpus[0] + ".idx.new")
    del docs
    os.replace(corpus[0] + ".bin.new", corpus[0] + ".bin")
    os.replace(corpus[0] + ".idx.new", corpus[0] + ".idx")
    with pytest.raises(ConfigError) as e:
        _trainer(corpus, run)
    text = str(e.value)
    assert f"cannot resume {checkpoint}" in text and "the tokenizer" not in text
    assert f"the data {corpus[0]} holds other files under the same path: .bin size" in text
    assert ".idx sha256" in text

    # And another tokenizer under the same name, its sidecar rewritten as preprocessing would: both named.
    train_tokenizer(["a different tiny corpus of words and more words"] * 50, str(tmp_path / "other.model"), 300)
    shutil.copyfile(tmp_path / "other.model", corpus[1])
    from card_megatron.tokenizers import load_tokenizer

    sidecar = corpus[1][: -len(".model")] + ".tokenizer.json"
    record = json.load(open(sidecar))
    record["sha256"] = load_tokenizer(corpus[1]).sha256
    json.dump(record, open(sidecar, "w"))
    with pytest.raises(ConfigError) as e:
        _trainer(corpus, run)
    text = str(e.value)
    assert f"the tokenizer {corpus[1]}: sha256 {meta['tokenizer_sha256'][:16]}... -> " in text
    assert f"the data {corpus[0]} holds other files" in text


# ------------------------------------------------------------------------------------ what may change


def test_settings_that_do_not_change_the_maths_resume_and_auto_compares_resolved(saved_run, tiny_corpus, tmp_path):
    """recompute_activations, fused_kernels and eval_t_samples may change; train.precision compares by
    what it resolves to: auto was fp32 on this CPU, so fp32 resumes and bf16 is refused."""
    from card_megatron.config import ConfigError

    run, checkpoint = _copy_run(saved_run, tmp_path)
    trainer = _trainer(
        tiny_corpus,
        run,
        "model.recompute_activations=true",
        "model.fused_kernels=false",
        "objective.eval_t_samples=2",
        "train.precision=fp32",
    )
    assert trainer.resumed_from == checkpoint and trainer.step == 1
    trainer.close()
    with pytest.raises(ConfigError, match=r"train.precision: 'auto' \(fp32\) -> 'bf16' \(bf16\)"):
        _trainer(tiny_corpus, run, "train.precision=bf16")
