"""The trainer's components on their own, single process, without a model or an engine: the run
directory (lock, markers, stop requests), the EMA's files per layout and its resume, the export's
shards and index, and the validation log line."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from card_megatron.config import OptimConfig
from card_megatron.lock import LockHeldError


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _info(tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0):
    return SimpleNamespace(
        rank=0, tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        device=torch.device("cpu"),
    )  # fmt: skip


def test_run_directory_lock_markers_and_stop_requests(single_process, tmp_path):
    from card_megatron.training.run_directory import FINISHED, PREEMPTED, STOP_FILE, RunDirectory

    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    run = str(tmp_path / "run")
    try:
        directory = RunDirectory(run, _info())
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):  # the holder is named
            RunDirectory(run, _info())
        assert not directory.stop_asked_here() and not directory.should_stop()
        open(os.path.join(run, STOP_FILE), "w").close()
        assert directory.stop_asked_here() and directory.should_stop()
        directory.mark_preempted(7)  # obeys the stop file: removes it
        assert open(os.path.join(run, PREEMPTED)).read() == "7" and not os.path.exists(os.path.join(run, STOP_FILE))
        assert not directory.stop_asked_here()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert directory.stop_requested and directory.stop_asked_here()
        directory.mark_finished(9)
        assert directory.is_marked_finished() and open(os.path.join(run, FINISHED)).read() == "9"
        directory.clear_end_markers()
        assert not os.path.exists(os.path.join(run, FINISHED)) and not os.path.exists(os.path.join(run, PREEMPTED))
        directory.release()
        RunDirectory(run, _info()).release()  # free again
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_ema_files_follow_the_layout_and_resume_refuses_another(tmp_path):
    from card_megatron.training.ema import RunEMA, ema_file_name, has_ema

    params = [("w", torch.nn.Parameter(torch.ones(2, 3)))]
    on = OptimConfig(ema_decay=0.5)
    zero1 = RunEMA(params, on, 1, None, _info(tp=2, pp=2, dp=2, tp_rank=1, pp_rank=1, dp_rank=1))
    assert zero1.file == "ema_tp01_pp001_dp00000.pt" and zero1.file_to_save() is None  # a replica: not written
    assert zero1.layout_files == {ema_file_name(t, p, 0) for t in range(2) for p in range(2)}
    partitioned = torch.nn.Parameter(torch.ones(2, 3))
    partitioned.ds_tensor = torch.ones(3)  # what ZeRO-3 leaves on one of two data-parallel ranks
    zero3 = RunEMA([("w", partitioned)], on, 3, object(), _info(tp=2, pp=2, dp=2, tp_rank=1, pp_rank=1, dp_rank=1))
    assert zero3.file == "ema_tp01_pp001_dp00001.pt" and len(zero3.layout_files) == 8

    one = RunEMA(params, on, 0, None, _info())
    file, state = one.file_to_save()
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    assert not has_ema(str(checkpoint))
    assert one.resume(str(checkpoint), 1, False) == [
        f"{checkpoint} has no EMA: the EMA (decay 0.5) starts from the weights of step 1"
    ]
    torch.save(state, checkpoint / file)
    assert has_ema(str(checkpoint)) and one.resume(str(checkpoint), 1, True) == [
        "train.drop_ema has no effect: optim.ema_decay is 0.5, the EMA is kept"
    ]
    off = RunEMA(params, OptimConfig(ema_decay=0.0), 0, None, _info())
    assert off.ema is None and off.file_to_save() is None
    assert "the EMA is dropped" in off.resume(str(checkpoint), 1, True)[0]
    with pytest.raises(ValueError, match="holds the EMA of another parallel layout"):
        zero1.resume(str(checkpoint), 1, False)


def test_export_shards_then_index_last(tmp_path):
    """Each rank's part becomes its shard files (data-parallel ranks other than 0 write none); rank 0's
    index, written after them, makes the export complete and reads back whole; a missing shard is named."""
    from card_megatron.model.sharded_export import ShardedExport, ShardPart
    from card_megatron.rundir import export_problem
    from card_megatron.training.checkpoint_contents import write_export_index, write_export_shards

    written = []

    def writing(file):
        written.append(os.path.basename(file))
        return file

    export = str(tmp_path / "export")
    full = torch.arange(12.0).reshape(4, 3)
    parts = []
    for tp in range(2):  # a weight split over TP=2 along its rows, with an EMA
        part = ShardPart(tp, 0, 2, 1, writes=True, weights={"w": full[2 * tp : 2 * tp + 2].clone()})
        part.pieces = {"w": {"name": "w", "start": [2 * tp, 0], "shape": [4, 3]}}
        part.ema = {"w": part.weights["w"] / 2}
        parts.append(part)
        write_export_shards(export, part, writing)
    write_export_shards(export, ShardPart(0, 0, 2, 1, writes=False), writing)  # data-parallel rank 1: nothing
    assert export_problem(export) is not None  # shards without an index: not an export yet
    write_export_index(export, parts[0], 5, 3, writing)
    assert written == ["model-tp00-pp000.safetensors", "model-tp01-pp000.safetensors", "model.index.json"]
    assert sorted(os.listdir(export)) == sorted(
        ["model-tp00-pp000.safetensors", "model-tp01-pp000.safetensors", "ema-tp00-pp000.safetensors"]
        + ["ema-tp01-pp000.safetensors", "model.index.json"]
    )
    assert export_problem(export) is None
    with ShardedExport(export) as exp:
        assert exp.step == 5 and torch.equal(exp.read("w"), full) and torch.equal(exp.read("w", ema=True), full / 2)
    os.remove(os.path.join(export, "model-tp01-pp000.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-tp01-pp000.safetensors is missing"):
        write_export_index(export, parts[0], 5, 3, writing)


def test_validation_line():
    from card_megatron.training.validation import format_eval

    ev = {"val_nll": 2.0, "val_ppl": 7.389, "val_ppl_is_bound": True, "probe_acc_k0": 0.5, "probe_conf_k0": 0.25}
    ev.update({"probe_acc_k1": 0.4, "probe_conf_k1": 0.125, "ema_val_nll": 1.5, "ema_val_ppl": 4.48})
    assert format_eval(12, ev) == (
        "step      12 | validation nll 2.0000 | perplexity <= 7.39 | probe k: acc/conf 0:0.50/0.25 1:0.40/0.12"
        " | EMA nll 1.5000 | EMA perplexity <= 4.48"
    )
