"""The sharded export (card_megatron/model/sharded_export.py): what TP=2 x PP=2 ranks write loads bit for
bit into one process and into another layout, a reader opens only the shards it needs, the index is
written last and a missing shard is refused naming it, and train.export_interval picks the saves."""

import json
import os

import pytest
import torch

from card_megatron.config import ModelConfig
from card_megatron.model import sharded_export as sx
from card_megatron.model.export import shard_for_rank
from card_megatron.rundir import EXPORT_INDEX, export_files, export_problem, resolve_export_dir
from card_megatron.training.checkpoint_contents import export_due
from tests.training_runs import REPO, overrides

NUM_LAYERS = 4
CONFIG = ModelConfig(num_layers=NUM_LAYERS, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, seq_length=16)
STAGES = ({"embedding", "layers.0", "layers.1"}, {"layers.2", "layers.3", "output"})  # PP=2: what each stage holds


@pytest.fixture(scope="module")
def model():
    from card_megatron.model.gpt import CardGPT
    from card_megatron.parallel.state import init_single_process

    init_single_process()
    return CardGPT(CONFIG, "causal", 256, tp_size=1, seed=3)


def _stage(name: str) -> int:
    return next(i for i, prefixes in enumerate(STAGES) if any(name.startswith(p + ".") for p in prefixes))


def _rank_params(model, tp_rank: int, tp_size: int, pp_rank: int) -> list[tuple[str, torch.Tensor]]:
    """What the parameters of (tp_rank, pp_rank) hold under TP=tp_size, PP=2: each one's slice of the
    single-process weight, carrying Megatron's split attributes (as a TP rank's parameter does)."""
    out = []
    for name, p in model.named_parameters():
        if _stage(name) != pp_rank:
            continue
        local = shard_for_rank(name, p.detach(), p, tp_rank, tp_size).clone()
        for attr in ("tensor_model_parallel", "partition_dim"):
            if hasattr(p, attr):
                setattr(local, attr, getattr(p, attr))
        out.append((name, local))
    return out


def _write_tp2_pp2(model, export_dir: str) -> None:
    """Every rank of TP=2 x PP=2 writes its shard (weights, and an EMA = weights / 2); then the index."""
    for pp in range(2):
        for tp in range(2):
            named = _rank_params(model, tp, 2, pp)
            part = sx.ShardPart(tp, pp, 2, 2, writes=True)
            part.weights, part.pieces = sx.local_pieces(named, NUM_LAYERS, tp, 2)
            part.ema = {k: v / 2 for k, v in part.weights.items()}
            sx.write_shards(export_dir, part)
    assert export_problem(export_dir) is not None  # shards without an index: not an export yet
    sx.write_index(export_dir, 2, 2, ema=True, step=7, layout={"tensor_model_parallel_size": 2})


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    export_dir = str(tmp_path_factory.mktemp("export"))
    _write_tp2_pp2(model, export_dir)
    return export_dir


def test_tp2_pp2_shards_load_bit_equal_into_one_process(model, exported):
    names = sorted(os.listdir(exported))
    assert names == sorted(
        [EXPORT_INDEX]
        + [f"{k}-tp{t:02d}-pp{p:03d}.safetensors" for k in ("ema", "model") for t in (0, 1) for p in (0, 1)]
    )
    expected = {name: p.detach() for name, p in model.named_parameters()}
    with sx.ShardedExport(exported) as reader:
        assert reader.step == 7 and reader.has_ema
        state, ema = reader.state_dict(), reader.state_dict(ema=True)
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
        assert torch.equal(ema[name], t / 2), name
    # and into a fresh single-process model (what load_model does)
    from card_megatron.model.gpt import CardGPT

    fresh = CardGPT(CONFIG, "causal", 256, tp_size=1, seed=99)
    with sx.ShardedExport(exported) as reader:
        reader.load_into(fresh, NUM_LAYERS)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name


@pytest.mark.parametrize("tp_size", [2, 4])
def test_another_layout_reads_its_slices(model, exported, tp_size):
    """A TP rank of another layout (TP=2 and TP=4; the export was written by TP=2 x PP=2) gets exactly
    ``shard_for_rank``'s slice of every weight, the gated MLP's [gate; up] rows included."""
    with sx.ShardedExport(exported) as reader:
        for name, p in model.named_parameters():
            for rank in range(tp_size):
                boxes = sx.tp_boxes(name, reader.shape(name), p, rank, tp_size)
                parts = [reader.read(name, box=b) for b in boxes]
                got = parts[0] if len(parts) == 1 else torch.cat(parts, dim=p.partition_dim)
                assert torch.equal(got, shard_for_rank(name, p.detach(), p, rank, tp_size)), (name, rank)


def test_only_the_needed_shards_are_opened(exported, monkeypatch):
    opened = []
    real = sx.safe_open

    def recording(file, *args, **kwargs):
        opened.append(os.path.basename(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(sx, "safe_open", recording)
    with sx.ShardedExport(exported) as reader:
        name = "embedding.embedding.word_embeddings.weight"  # vocab-parallel: rows 0..127 are TP rank 0's
        rows = reader.read(name, box=[(0, 100), (0, 64)])
        assert rows.shape == (100, 64)
        assert opened == ["model-tp00-pp000.safetensors"]
        reader.read(
            "layers.3.layer.mlp.linear_fc2.weight", box=[(0, 64), (48, 96)]
        )  # row-parallel: TP rank 1's columns
        assert opened == ["model-tp00-pp000.safetensors", "model-tp01-pp001.safetensors"]
        reader.read("layers.3.layer.mlp.linear_fc2.weight")  # the whole weight: both TP ranks of stage 1
        assert sorted(opened[2:]) == ["model-tp00-pp001.safetensors"]
        assert reader.opened == opened


def test_a_missing_shard_is_refused_naming_it(model, tmp_path):
    export_dir = str(tmp_path / "export")
    _write_tp2_pp2(model, export_dir)
    missing = os.path.join(export_dir, "model-tp01-pp001.safetensors")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        sx.ShardedExport(export_dir)
    assert missing in export_problem(export_dir)
    for name in ("config.yaml", "tokenizer.model"):  # everything else of an export is there
        open(os.path.join(export_dir, name), "w").close()
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        export_files(export_dir)
    # the index is built from the shards on disk: without one of them it is not written at all
    os.remove(os.path.join(export_dir, EXPORT_INDEX))
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        sx.write_index(export_dir, 2, 2, ema=True, step=7, layout={})
    assert not os.path.exists(os.path.join(export_dir, EXPORT_INDEX))


def test_a_truncated_shard_is_refused(model, tmp_path):
    export_dir = str(tmp_path / "export")
    _write_tp2_pp2(model, export_dir)
    shard = os.path.join(export_dir, "ema-tp00-pp000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FileNotFoundError, match=f"{shard} holds 100 bytes, the index"):
        sx.ShardedExport(export_dir)


def test_the_index_records_pieces_full_shapes_dtype_and_layout(exported):
    with open(os.path.join(exported, EXPORT_INDEX)) as f:
        index = json.load(f)
    assert index["layout"] == {"tensor_model_parallel_size": 2} and index["step"] == 7
    fc1 = index["weights"]["layers.1.layer.mlp.linear_fc1.weight"]
    assert fc1["shape"] == [192, 64] and fc1["dtype"] == "F32"
    # TP rank 1's shard holds gate rows 48..95 and up rows 144..191 of the canonical [gate; up]
    assert sorted((p["file"], p["start"]) for p in fc1["pieces"]) == [
        ("model-tp00-pp000.safetensors", [0, 0]),
        ("model-tp00-pp000.safetensors", [96, 0]),
        ("model-tp01-pp000.safetensors", [48, 0]),
        ("model-tp01-pp000.safetensors", [144, 0]),
    ]
    norm = index["weights"]["layers.1.layer.input_layernorm.weight"]
    assert [p["file"] for p in norm["pieces"]] == ["model-tp00-pp000.safetensors"]  # replicated: written once


def test_export_due():
    # train_iters 10, a save every 2 steps
    assert [s for s in range(1, 11) if export_due(s, 10, 2, 1)] == list(range(1, 11))  # 1: every save
    assert [s for s in (2, 4, 6, 8, 10) if export_due(s, 10, 2, 0)] == [10]  # 0: only the final one
    assert [s for s in (2, 4, 6, 8, 10) if export_due(s, 10, 2, 2)] == [4, 8, 10]  # 2: every second save
    assert not export_due(5, 10, 2, 2)  # a save on a signal between them
    assert export_due(5, 10, 0, 1) and not export_due(5, 10, 0, 3)


def test_export_interval_in_training_saves_and_the_index_is_written_last(tiny_corpus, tmp_path, monkeypatch):
    """train.export_interval=2 with a save every step: steps 2 and 4 (the end) export, 1 and 3 do not; the
    index is written after every other file of the export; the run directory and pruning find the
    newest export; what is loaded equals the trainer's weights."""
    from card_megatron.config import load_config
    from card_megatron.inference.loading import load_model
    from card_megatron.training import checkpoint_contents
    from card_megatron.training.trainer import Trainer

    run = str(tmp_path / "run")
    extra = ("train.save_interval=1", "train.export_interval=2", "train.keep_last_checkpoints=1")
    cfg = load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(tiny_corpus, run, 4, *extra))
    real_write_index = checkpoint_contents.write_index
    seen = []

    def checked_write_index(export_dir, *args, **kwargs):
        present = set(os.listdir(export_dir))
        assert EXPORT_INDEX not in present
        assert {"config.yaml", "tokenizer.model", "model-tp00-pp000.safetensors"} <= present, present
        seen.append(export_dir)
        return real_write_index(export_dir, *args, **kwargs)

    monkeypatch.setattr(checkpoint_contents, "write_index", checked_write_index)
    trainer = Trainer(cfg)
    step_dir = os.path.join(run, "checkpoints", "step_{:08d}")
    try:
        for step in range(1, 5):
            trainer.train_step()
            trainer.save()
            assert os.path.isdir(os.path.join(step_dir.format(step), "export")) == (step % 2 == 0), step
            if step == 3:  # step 2 (the newest export) is kept beside step 3 (keep_last_checkpoints=1)
                assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
                    "latest",
                    "step_00000002",
                    "step_00000003",
                ]
                assert resolve_export_dir(run) == os.path.join(step_dir.format(2), "export")
                with pytest.raises(FileNotFoundError, match="holds no export"):
                    resolve_export_dir(step_dir.format(3))
        weights = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    finally:
        trainer.close()
    assert seen == [os.path.join(step_dir.format(s), "export") for s in (2, 4)]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000004"]
    loaded = load_model(run, device="cpu")
    assert loaded.step == 4
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_a_failed_shard_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type; the writer raises it as an OSError with its
    errno and the shard's final name (checkpoint.save_checkpoint then says "No space left on device")."""
    import errno

    from safetensors import SafetensorError

    def full_disk(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(sx, "save_file", full_disk)
    part = sx.ShardPart(1, 0, 2, 1, writes=True, weights={"w": torch.zeros(2)}, pieces={})
    with pytest.raises(OSError) as e:
        sx.write_shards(str(tmp_path), part)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model-tp01-pp000.safetensors")
    assert os.listdir(tmp_path) == []


def test_init_from_loads_straight_from_the_shards(model, exported):
    """train.init_from reads the index only up front; each rank then reads its own slices (here one
    process: all of them); the whole state is read only to grow rows the TP size does not divide."""
    from card_megatron.model.gpt import CardGPT
    from card_megatron.training.init_from import InitWeights

    init = InitWeights(path=exported, step=7, state={}, rows=256)
    fresh = CardGPT(CONFIG, "causal", 256, tp_size=1, seed=99)
    init.load_into(fresh, NUM_LAYERS, tp_rank=0, tp_size=1)
    expected = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert init.state == {}


def test_a_run_without_any_export_says_so(tmp_path):
    """train.export_interval=0 and a run stopped before its end: checkpoints, none with an export."""
    step = tmp_path / "run" / "checkpoints" / "step_00000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 5, "files": {}}))
    (step.parent / "latest").write_text("step_00000005")
    with pytest.raises(FileNotFoundError, match="none of its complete checkpoints holds an export"):
        resolve_export_dir(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match=f"checkpoint {step} holds no export"):
        resolve_export_dir(str(step))
