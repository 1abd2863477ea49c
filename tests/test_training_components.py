"""The trainer's components on their own, single process, without a model or an engine: the run
directory (lock, markers, stop requests), the EMA's files per layout and its resume, the export's
merge of pipeline stages, and the validation log line."""

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


def test_export_stages_merge_into_one_model_file(tmp_path):
    from card_megatron.training.checkpoint_contents import merge_export, write_export_stage

    written = []

    def writing(file):
        written.append(os.path.basename(file))
        return file

    export = str(tmp_path / "export")
    first, second = {"a": torch.zeros(2)}, {"b": torch.ones(3)}
    write_export_stage(export, 0, first, {"a": torch.full((2,), 0.5)}, writing)
    write_export_stage(export, 1, second, {"b": torch.full((3,), 0.25)}, writing)
    merge_export(export, 2, 5, writing)
    assert written == ["stage_000.pt", "stage_001.pt", "model.pt"] and os.listdir(export) == ["model.pt"]
    blob = torch.load(os.path.join(export, "model.pt"), weights_only=True)
    assert blob["step"] == 5 and set(blob["state_dict"]) == {"a", "b"} and set(blob["ema_state_dict"]) == {"a", "b"}
    torch.testing.assert_close(blob["state_dict"]["b"], second["b"])
    write_export_stage(export, 0, first, None, writing)  # without EMA: no ema_state_dict
    merge_export(export, 1, 6, writing)
    assert "ema_state_dict" not in torch.load(os.path.join(export, "model.pt"), weights_only=True)


def test_validation_line():
    from card_megatron.training.validation import format_eval

    ev = {"val_nll": 2.0, "val_ppl": 7.389, "val_ppl_is_bound": True, "probe_acc_k0": 0.5, "probe_conf_k0": 0.25}
    ev.update({"probe_acc_k1": 0.4, "probe_conf_k1": 0.125, "ema_val_nll": 1.5, "ema_val_ppl": 4.48})
    assert format_eval(12, ev) == (
        "step      12 | validation nll 2.0000 | perplexity <= 7.39 | probe k: acc/conf 0:0.50/0.25 1:0.40/0.12"
        " | EMA nll 1.5000 | EMA perplexity <= 4.48"
    )
