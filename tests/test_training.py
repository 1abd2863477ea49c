"""Training: every parallel layout matches the single-process run; exact resume; failures handled.

Multi-process tests run under torchrun on gloo (2 ranks) with timeouts.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.training_runs import (
    LOSS_REL_TOL,
    REPO,
    assert_same_weights,
    command,
    env,
    kill_tree,
    losses,
    overrides,
    read_export,
    records,
    train,
)

ITERS = 6


@pytest.fixture(scope="module")
def baseline(tiny_corpus, tmp_path_factory):
    """One process, no ZeRO: global batch 8 = micro-batch 4 x 2 accumulation steps."""
    run = str(tmp_path_factory.mktemp("baseline"))
    train(1, overrides(tiny_corpus, run, ITERS))
    return run


LAYOUTS = {
    "dp2_zero0": ["parallel.zero_stage=0"],
    "dp2_zero1": ["parallel.zero_stage=1"],
    "dp2_zero2": ["parallel.zero_stage=2"],
    "dp2_zero3": ["parallel.zero_stage=3"],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2_loader_workers": ["data.num_workers=1"],  # one persistent DataLoader per run
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, baseline, tiny_corpus, tmp_path):
    """Same data, same seed: the loss of every step and the trained weights match one process (fp32)."""
    run = str(tmp_path / layout)
    train(2, overrides(tiny_corpus, run, ITERS, *LAYOUTS[layout]))
    expected, got = losses(baseline), losses(run)
    assert sorted(got) == list(range(1, ITERS + 1))
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=LOSS_REL_TOL), (layout, step, got[step], expected[step])
    assert got[ITERS] < got[1]
    # Validation is on the same samples whatever the layout (step 0: the same initial weights).
    v0, v1 = records(baseline, "eval.jsonl"), records(run, "eval.jsonl")
    assert math.isclose(v0[0]["val_nll"], v1[0]["val_nll"], rel_tol=LOSS_REL_TOL)
    # The consolidated export is layout-independent: same weights as the single-process run
    # (tolerance and its reason: tests/training_runs.py).
    a = read_export(os.path.join(baseline, "checkpoints", f"step_{ITERS:08d}"))["state_dict"]
    b = read_export(os.path.join(run, "checkpoints", f"step_{ITERS:08d}"))["state_dict"]  # TP/PP shards
    assert_same_weights(a, b, layout)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["arm", "mdlm", "bd3lm"])
def test_each_objective_trains(objective, tiny_corpus, tmp_path):
    run = str(tmp_path / objective)
    train(1, overrides(tiny_corpus, run, 8, f"objective.name={objective}", "objective.block_size=8"))
    steps = losses(run)
    assert all(math.isfinite(v) for v in steps.values())
    assert steps[8] < steps[1]
    evals = records(run, "eval.jsonl")
    assert evals[0]["val_ppl_is_bound"] == (objective != "arm")
    assert evals[-1]["val_nll"] < evals[0]["val_nll"]


@pytest.mark.slow
def test_exact_resume_after_exit_interval_and_kill(tiny_corpus, tmp_path):
    """Interrupted (exit_interval; kill -9 after a checkpoint) and resumed: bit-identical later losses."""
    extra = ["parallel.zero_stage=1"]
    full = str(tmp_path / "full")
    train(2, overrides(tiny_corpus, full, 8, *extra))
    reference = losses(full)

    stopped = str(tmp_path / "exit_interval")
    train(2, overrides(tiny_corpus, stopped, 8, *extra, "train.exit_interval=3"))
    assert max(losses(stopped)) == 3
    assert open(os.path.join(stopped, "checkpoints", "latest")).read().strip() == "step_00000003"
    train(2, overrides(tiny_corpus, stopped, 8, *extra))
    resumed = losses(stopped)
    for step in range(4, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(
        command(2, overrides(tiny_corpus, killed, 8, *extra, "train.save_interval=2")),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(latest) and open(latest).read().strip() >= "step_00000002":
            break
        time.sleep(0.05)
    kill_tree(proc.pid)  # torchrun and its workers (each in a session of its own)
    proc.wait()
    killed_at = int(open(latest).read().strip().split("_")[1])
    assert killed_at < 8, "the run finished before it could be killed"
    train(2, overrides(tiny_corpus, killed, 8, *extra, "train.save_interval=2", "train.keep_last_checkpoints=2"))
    resumed = losses(killed)
    for step in range(killed_at + 1, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    # Only the last 2 complete checkpoints are kept.
    kept = sorted(d for d in os.listdir(os.path.join(killed, "checkpoints")) if d.startswith("step_"))
    assert kept == ["step_00000006", "step_00000008"], kept


@pytest.mark.slow
def test_resume_with_a_different_data_parallel_size(tiny_corpus, tmp_path):
    """Trained on 1 rank, resumed on 2: the same global sample stream, the same losses (to fp32 rounding)."""
    full = str(tmp_path / "full")
    train(1, overrides(tiny_corpus, full, 6))
    run = str(tmp_path / "resized")
    train(1, overrides(tiny_corpus, run, 6, "train.exit_interval=3"))
    train(2, overrides(tiny_corpus, run, 6))
    a, b = records(full), records(run)
    by_step = {r["step"]: r for r in b}
    for r in a:
        assert by_step[r["step"]]["consumed_samples"] == r["consumed_samples"]
        assert math.isclose(by_step[r["step"]]["loss"], r["loss"], rel_tol=LOSS_REL_TOL)


@pytest.mark.slow
def test_signal_and_stop_file_save_and_exit(tiny_corpus, tmp_path):
    """SIGUSR1 (or the SAVE_AND_EXIT file) -> checkpoint at the next step boundary, 'preempted', exit 0."""
    for how in ("signal", "file"):
        run = str(tmp_path / how)
        proc = subprocess.Popen(
            command(1, overrides(tiny_corpus, run, 500)),
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        metrics = os.path.join(run, "metrics.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
            time.sleep(0.1)
        if how == "signal":
            proc.send_signal(signal.SIGUSR1)
        else:
            open(os.path.join(run, "SAVE_AND_EXIT"), "w").close()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        step = int(open(os.path.join(run, "preempted")).read())
        assert 2 <= step < 500
        assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == f"step_{step:08d}"
        assert not os.path.exists(os.path.join(run, "finished"))
        assert not os.path.exists(os.path.join(run, "SAVE_AND_EXIT"))
        assert max(losses(run)) == step


def test_nonfinite_loss_skips_the_step_then_stops(tiny_corpus, tmp_path, monkeypatch):
    """A non-finite loss leaves the weights unchanged and is counted; too many in a row stop the run."""
    from card_megatron.config import load_config
    from card_megatron.training.trainer import NonFiniteLossError, Trainer

    cfg = load_config(
        os.path.join(REPO, "configs", "tiny-cpu.yaml"),
        overrides(tiny_corpus, str(tmp_path / "nan"), 10, "train.max_nonfinite_steps=3"),
    )
    trainer = Trainer(cfg)
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    real_loss = trainer.objective.loss
    monkeypatch.setattr(
        trainer.objective, "loss", lambda nll, li: (real_loss(nll, li)[0] * float("nan"), real_loss(nll, li)[1])
    )
    trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.step == 2
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train_step()
    monkeypatch.setattr(trainer.objective, "loss", real_loss)


def test_bad_config_is_reported_before_training(tiny_corpus, tmp_path):
    proc = subprocess.run(
        command(1, overrides(tiny_corpus, str(tmp_path / "bad"), 5, "model.num_attention_heads=5")),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.hidden_size (64) must be divisible by model.num_attention_heads (5)" in proc.stderr


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused(tiny_corpus, tmp_path):
    """What a resume may not change is listed (and nothing else), before any library call can fail on it."""
    run = str(tmp_path / "run")
    train(1, overrides(tiny_corpus, run, 2))
    changed = overrides(
        tiny_corpus,
        run,
        3,
        "model.seq_length=16",
        "objective.name=arm",
        "parallel.zero_stage=1",
        "data.data_path=/elsewhere/docs_text_document",
        "optim.lr=1e-3",
        "train.log_interval=2",
    )
    proc = subprocess.run(command(1, changed), cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "cannot resume" in err and "step_00000002" in err and "Traceback" not in err
    for change in (
        "model.seq_length: 32 -> 16",
        "objective.name: 'card' -> 'arm'",
        "parallel.zero_stage: 0 -> 1",
        f"data.data_path: '{tiny_corpus[0]}' -> '/elsewhere/docs_text_document'",
    ):
        assert change in err, change
    assert "train.train_iters" not in err and "optim.lr" not in err and "log_interval" not in err


@pytest.mark.slow
def test_data_of_another_tokenizer_is_refused(tiny_corpus, tmp_path):
    """data.tokenizer_model must be the tokenizer that made the shard (its sidecar says which)."""
    from card_megatron.tokenizers import train_tokenizer

    other = str(tmp_path / "other.model")
    train_tokenizer(["a different tiny corpus of words and more words"] * 50, other, 300)
    args = overrides(tiny_corpus, str(tmp_path / "run"), 2, f"data.tokenizer_model={other}")
    proc = subprocess.run(command(1, args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{tiny_corpus[0]} was tokenized with {os.path.abspath(tiny_corpus[1])}" in proc.stderr
    assert f"data.tokenizer_model is {other}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_directory(tiny_corpus, tmp_path):
    run = str(tmp_path / "wandb")
    train(1, overrides(tiny_corpus, run, 2, "logging.wandb=true"))
    offline = [d for d in os.listdir(os.path.join(run, "wandb")) if d.startswith("offline-run-")]
    assert len(offline) == 1, os.listdir(os.path.join(run, "wandb"))
    assert (
        os.path.getsize(
            os.path.join(
                run, "wandb", offline[0], f"run-{open(os.path.join(run, 'wandb_id.txt')).read().strip()}.wandb"
            )
        )
        > 0
    )


# ---------------------------------------------------------------- nothing silent, nothing lost (issue 14)


def _fake_checkpoint(root, step, files):
    """A checkpoint directory with ``files`` (name -> bytes) and a manifest, as save_checkpoint writes it."""
    path = os.path.join(root, f"step_{step:08d}")
    os.makedirs(path)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    meta = {"step": step, "consumed_samples": 8 * step, "files": {n: len(d) for n, d in files.items()}}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def test_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, caplog):
    """A truncated or missing file, an empty or dangling `latest`: warned about by name, the newest
    complete checkpoint is used; with none complete, an error naming every problem."""
    from card_megatron.rundir import latest_checkpoint

    run = str(tmp_path)
    root = os.path.join(run, "checkpoints")
    os.makedirs(root)
    assert latest_checkpoint(run) is None
    files = {"mp_rank_00_model_states.pt": b"x" * 100, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 50}
    two = _fake_checkpoint(root, 2, files)
    four = _fake_checkpoint(root, 4, files)
    latest = os.path.join(root, "latest")
    with open(latest, "w") as f:
        f.write("step_00000004")
    assert latest_checkpoint(run) == four
    victim = os.path.join(four, "mp_rank_00_model_states.pt")
    open(victim, "w").close()  # killed mid-save: 0 bytes
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run) == two
    assert (
        f"{victim} holds 0 bytes" in caplog.text
        and f"resuming from the newest complete checkpoint, {two}" in caplog.text
    )
    os.remove(victim)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run) == two
    assert f"{victim} is missing" in caplog.text
    open(latest, "w").close()  # an empty latest
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run) == two
    assert "is empty or names no checkpoint" in caplog.text
    os.remove(os.path.join(two, "meta.json"))
    with pytest.raises(ValueError, match=r"no complete checkpoint .*meta.json is missing"):
        latest_checkpoint(run)


@pytest.mark.slow
def test_finished_run_saves_nothing_and_a_broken_checkpoint_falls_back(tiny_corpus, tmp_path):
    """Rerunning a finished run saves nothing (`latest` is never rewritten in place); a newest checkpoint
    truncated to 0 bytes is named and the run resumes bit-exactly from the one before."""
    run = str(tmp_path / "run")
    args = overrides(tiny_corpus, run, 4, "train.save_interval=2")
    train(1, args)
    reference = losses(run)
    model = os.path.join(run, "checkpoints", "step_00000004", "mp_rank_00_model_states.pt")
    before = os.stat(model)
    again = train(1, args)
    assert "the run is finished, nothing to do" in again.stderr
    after = os.stat(model)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)

    open(model, "w").close()  # a kill during a save of the same tag left it at 0 bytes
    resumed = train(1, args)
    assert f"{model} holds 0 bytes" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000002 at step 2" in resumed.stderr
    got = losses(run)
    for step in (3, 4):
        assert got[step] == reference[step], (step, got[step], reference[step])
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_00000004"
    assert os.path.getsize(model) > 0


@pytest.mark.slow
def test_planted_payload_in_a_checkpoint_does_not_run(tiny_corpus, tmp_path):
    """Resuming reads every checkpoint file with weights_only=True: a pickle that would run code is
    refused by name, and its code never runs."""
    run = str(tmp_path / "run")
    train(1, overrides(tiny_corpus, run, 2))
    path = os.path.join(run, "checkpoints", "step_00000002")
    marker = str(tmp_path / "pwned")
    victim = os.path.join(path, "mp_rank_00_model_states.pt")
    state = torch.load(victim, weights_only=False)  # the test trusts its own file
    state["payload"] = _Payload(marker)
    torch.save(state, victim)
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"]["mp_rank_00_model_states.pt"] = os.path.getsize(victim)  # the planter fixes the manifest too
    json.dump(meta, open(meta_path, "w"))
    proc = subprocess.run(
        command(1, overrides(tiny_corpus, run, 4)), cwd=REPO, env=env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"refusing to load {victim}" in proc.stderr and "train.trust_checkpoint=true" in proc.stderr
    assert not os.path.exists(marker)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_second_trainer_on_a_run_dir_is_refused(tiny_corpus, tmp_path):
    """rank 0 holds {run_dir}/run.lock for the whole run: a second trainer is refused, naming the holder."""
    from card_megatron.lock import ExclusiveLock

    run = tmp_path / "run"
    run.mkdir()
    with ExclusiveLock(str(run / "run.lock")):
        proc = subprocess.run(
            command(1, overrides(tiny_corpus, str(run), 2)),
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{run / 'run.lock'} is locked by host " in proc.stderr and f"pid {os.getpid()} since " in proc.stderr
    assert not os.path.exists(run / "metrics.jsonl")


def test_disk_full_during_a_save_says_so_and_keeps_the_last_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    """A full disk during a save (torch.save's own error on a full disk: a short write reported as
    "unexpected pos", no errno) is named with the file, the previous checkpoint stays `latest`, the
    unfinished directory is removed, and the error is an OSError (train.py prints it, no traceback)."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    from card_megatron.config import load_config
    from card_megatron.rundir import latest_checkpoint
    from card_megatron.training import checkpoint as ckpt
    from card_megatron.training.trainer import Trainer

    cfg = load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(tiny_corpus, str(tmp_path / "full"), 4))
    trainer = Trainer(cfg)
    trainer.train_step()
    first = trainer.save()

    def full_disk_save(obj, path, **kwargs):  # what torch.save raised on a full tmpfs (measured, issue 21)
        with open(path, "wb") as f:
            f.write(b"PK" * 100)
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904

    monkeypatch.setattr(torch_checkpoint_engine.torch, "save", full_disk_save)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda root: 4096)
    trainer.train_step()
    second = os.path.join(cfg.train.run_dir, "checkpoints", "step_00000002")
    with pytest.raises(OSError) as e:
        trainer.save()
    text = str(e.value)
    assert f"No space left on device while writing {second}/mp_rank_00_model_states.pt" in text
    assert "unexpected pos 576 vs 534" in text and f"the previous checkpoint {first} stays intact" in text
    assert latest_checkpoint(cfg.train.run_dir) == first and not os.path.exists(second)

    monkeypatch.setattr(ckpt, "_free_bytes", lambda root: 2**30)  # the same short write with room left
    with pytest.raises(OSError, match=r"writing .*mp_rank_00_model_states.pt failed \(\[enforce fail"):
        trainer.save()
    trainer.close()


def test_disk_full_on_a_real_small_filesystem(tiny_corpus, tmp_path):
    """The same on a real full disk: a 16 MiB tmpfs (needs root and mount; skipped elsewhere)."""
    import subprocess as sp

    from card_megatron.config import load_config
    from card_megatron.rundir import latest_checkpoint
    from card_megatron.training.trainer import Trainer

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or sp.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root and mount to make a small filesystem")
    try:
        cfg = load_config(os.path.join(REPO, "configs", "tiny-cpu.yaml"), overrides(tiny_corpus, str(mnt / "run"), 4))
        trainer = Trainer(cfg)
        trainer.train_step()
        first = trainer.save()
        free = shutil.disk_usage(mnt).free
        with open(mnt / "filler", "wb") as f:  # leave a third of what one checkpoint needs
            f.write(b"\0" * max(0, free - ckpt_size(first) // 3))
        trainer.train_step()
        with pytest.raises(OSError, match=r"No space left on device while writing .*step_00000002/") as e:
            trainer.save()
        assert f"the previous checkpoint {first} stays intact" in str(e.value)
        assert latest_checkpoint(cfg.train.run_dir) == first
        trainer.close()
    finally:
        sp.run(["umount", "-l", str(mnt)])


def ckpt_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def test_stale_extension_build_lock_is_removed_with_a_warning(tmp_path, monkeypatch, caplog):
    """A torch-extension build killed midway leaves `lock`, on which every later start would wait in
    silence. A lock is stale when no process holds it open (the builder does, for the whole build),
    whatever its age: removed with a warning naming the op; a held one is kept, naming the op and the
    process building it (issue 21)."""
    from card_megatron.parallel import cpu_adapter

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    young = tmp_path / "py311_cpu" / "other_op" / "lock"
    held = tmp_path / "py311_cpu" / "building_op" / "lock"
    for lock in (stale, young, held):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 2 * cpu_adapter.STALE_BUILD_LOCK_S
    os.utime(stale, (old, old))
    os.utime(held, (old, old))  # old but held: kept
    fd = os.open(held, os.O_RDONLY)  # this process is "building" building_op, as torch's FileBaton holds it
    try:
        assert cpu_adapter.lock_holders(str(held)) == [os.getpid()] and cpu_adapter.lock_holders(str(young)) == []
        with caplog.at_level("WARNING"):
            assert cpu_adapter.clear_stale_build_locks() == [str(stale), str(young)]
    finally:
        os.close(fd)
    assert not stale.exists() and not young.exists() and held.exists()
    assert f"removed {stale}" in caplog.text and "a build of deepspeed_shm_comm was interrupted" in caplog.text
    assert f"{held} is held by pid {os.getpid()} (" in caplog.text and "building building_op" in caplog.text


@pytest.mark.slow
def test_training_starts_despite_a_killed_op_build(tiny_corpus, tmp_path):
    """The same end to end: DeepSpeed's CPU op cache with a lock left by a killed build; training starts."""
    import shutil

    from torch.utils.cpp_extension import get_default_build_root

    from card_megatron.parallel import cpu_adapter

    root = tmp_path / "extensions"
    built = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    if os.path.isdir(built):
        shutil.copytree(built, root, ignore=shutil.ignore_patterns("lock"))
    lock = root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = time.time() - 2 * cpu_adapter.STALE_BUILD_LOCK_S
    os.utime(lock, (old, old))
    proc = subprocess.run(
        command(1, overrides(tiny_corpus, str(tmp_path / "run"), 1)),
        cwd=REPO,
        env={**env(), "TORCH_EXTENSIONS_DIR": str(root)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {lock}" in proc.stderr
