"""The SLURM side: slurm/pretrain.sh and slurm/preprocess.sh on a real (private) SLURM.

Tiers:
* dry-run and launch-check tests need only bash and Python;
* ``slurm`` tests bring up a private single-node cluster (tests/slurm_cluster.py) once
  per session and submit real jobs: a trivial job, the CPU override of the GPU
  header, the USR1 -> checkpoint -> requeue -> resume protocol of the template with a
  fake trainer (tests/fake_trainer.py), and the preprocessing array + merge with a
  fake tool (tests/fake_preprocess.py);
* end-to-end tests train ``configs/tiny-cpu.yaml`` with the real trainer on 2 CPU
  processes; they skip until ``card_megatron/train.py`` (and its config and data
  tool) exist;
* ``two nodes``: a private two-node cluster (``TwoNodeCluster``: one network namespace
  per node on a private bridge) runs ``sbatch -N2 slurm/pretrain.sh`` with the real
  trainer (data parallel across nodes, tensor parallel inside them, preemption, a lost
  node, a peer that cannot be reached) and ``slurm/preprocess.sh`` across both nodes.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from slurm_cluster import SlurmCluster, TwoNodeCluster, missing_programs, netns_unavailable

from card_megatron.config import ConfigError
from card_megatron.launch_check import check_launch
from card_megatron.launch_check import main as launch_check_main
from tests.training_runs import LOSS_REL_TOL, losses, overrides, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "slurm", "pretrain.sh")
PREPROCESS = os.path.join(ROOT, "slurm", "preprocess.sh")
FAKE_TRAINER = os.path.join(ROOT, "tests", "fake_trainer.py")
FAKE_PREPROCESS = os.path.join(ROOT, "tests", "fake_preprocess.py")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
PREPROCESS_TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


def _local_env(**extra: str) -> dict[str, str]:
    """The environment of a shell outside any SLURM job (even if pytest runs in one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _wait_for(cond, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private single-node SLURM cluster for the whole session; stopped by PID at the end."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the private SLURM cluster runs its daemons as root (SlurmUser=root)")
    # At least 2 CPUs declared so 2-process jobs fit on a 1-core runner too.
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), cpus=max(2, os.cpu_count() or 1))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def small_config(tmp_path) -> str:
    """A config with TP=2 (what the layout checks need); the fake trainer ignores the rest."""
    return _write(
        tmp_path / "small.yaml",
        "model:\n  num_layers: 4\n  num_attention_heads: 4\n"
        "parallel:\n  tensor_model_parallel_size: 2\n"
        "train:\n  micro_batch_size: 2\n  global_batch_size: 8\n",
    )


# --------------------------------------------------------------------------- launch check, dry run


def test_launch_check_validates_layout_against_world_size(small_config, capsys):
    cfg = check_launch(small_config, ["parallel.pipeline_model_parallel_size=2"], world_size=8)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2
    with pytest.raises(
        ConfigError,
        match=r"world size \(6\) must be divisible by tensor_model_parallel_size \(2\) x "
        r"pipeline_model_parallel_size \(2\)",
    ):
        check_launch(small_config, ["parallel.pipeline_model_parallel_size=2"], world_size=6)
    with pytest.raises(ConfigError, match=r"world size \(0\)"):
        check_launch(small_config, [], world_size=0)
    assert launch_check_main(["--config", small_config, "--world-size", "4", "train.micro_batch_size=1"]) == 0
    assert "world size 4 = tensor 2 x pipeline 1 x data 2" in capsys.readouterr().out
    # data parallel 3 does not divide global batch 8 / micro batch 2
    assert launch_check_main(["--config", small_config, "--world-size", "6"]) == 1
    assert "global_batch_size (8) must be a multiple of micro_batch_size (2) x data-parallel size (3)" in (
        capsys.readouterr().err
    )


@pytest.mark.slow  # slurm/pretrain.sh runs the launch check (imports torch): ~5 s
def test_dry_run_prints_commands_for_a_fitting_gpu_layout(small_config, tmp_path):
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", small_config, "parallel.pipeline_model_parallel_size=2"],
        env=_local_env(NNODES="2", GPUS_PER_NODE="4"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "world size 8 = tensor 2 x pipeline 2 x data 2" in out
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in out
    assert "-m torch.distributed.run --nnodes=2 --nproc-per-node=4" in out
    assert (
        f"-m card_megatron.train --config {small_config} parallel.pipeline_model_parallel_size=2 "
        "train.run_dir=runs/card-pretrain-dryrun" in out
    )
    assert "cuda (4 GPUs per node, nccl)" in out and "dry run: nothing launched" in out
    # Two nodes: the rendezvous is an address, not a name, and both NCCL and gloo get this node's route to it.
    addr = re.search(r"rendezvous  (\S+):20000", out).group(1)
    assert re.fullmatch(r"[0-9.]+", addr), out
    assert not addr.startswith("127."), out  # never loopback, even where the host name resolves to it
    assert re.search(
        rf"interface   \S+ on this node \(GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; each node takes its "
        rf"route to {re.escape(addr)}\)",
        out,
    ), out
    assert not os.path.exists(os.path.join(ROOT, "runs", "card-pretrain-dryrun"))


@pytest.mark.slow  # slurm/pretrain.sh runs the launch check (imports torch): ~5 s
def test_dry_run_cpu_uses_procs_per_node_and_given_run_dir(small_config, tmp_path):
    run_dir = str(tmp_path / "myrun")
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", small_config, f"train.run_dir={run_dir}"],
        env=_local_env(GPUS_PER_NODE="0", PROCS_PER_NODE="2", TRAIN_MODULE="my.trainer"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "cpu (gloo)" in r.stdout and "--nnodes=1 --nproc-per-node=2" in r.stdout
    assert "rendezvous  127.0.0.1:" in r.stdout  # one node: loopback
    assert "interface   lo on this node (GLOO_SOCKET_IFNAME; each node takes its route to 127.0.0.1)" in r.stdout
    assert f"-m my.trainer --config {small_config} train.run_dir={run_dir}\n" in r.stdout
    assert not os.path.exists(run_dir)


@pytest.mark.slow  # slurm/pretrain.sh runs the launch check (imports torch): ~5 s
@pytest.mark.parametrize(
    "env, overrides, message",
    [
        (
            {"NNODES": "1", "GPUS_PER_NODE": "3"},
            [],
            "world size (3) must be divisible by tensor_model_parallel_size (2) x pipeline_model_parallel_size (1)",
        ),
        (
            {"NNODES": "2", "GPUS_PER_NODE": "4"},
            ["parallel.pipeline_model_parallel_size=3"],
            "model.num_layers (4) must be divisible by parallel.pipeline_model_parallel_size (3)",
        ),
        (
            {"GPUS_PER_NODE": "0", "PROCS_PER_NODE": "1"},
            [],
            "world size (1) must be divisible by tensor_model_parallel_size (2)",
        ),
    ],
)
def test_dry_run_rejects_layouts_that_do_not_fit(small_config, env, overrides, message):
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", small_config, *overrides],
        env=_local_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert message in r.stderr
    assert "the config does not fit this job" in r.stderr
    assert "dry run: nothing launched" not in r.stdout


def test_dry_run_shows_an_interface_the_user_chose(small_config):
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", small_config, "parallel.tensor_model_parallel_size=1"],
        env=_local_env(NNODES="2", GPUS_PER_NODE="0", GLOO_SOCKET_IFNAME="ib0", MASTER_ADDR="10.1.2.3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "rendezvous  10.1.2.3:20000" in r.stdout and "--master-addr=10.1.2.3" in r.stdout
    assert "interface   GLOO_SOCKET_IFNAME=ib0 (set by you, used on every node)" in r.stdout


def test_dry_run_checks_the_interpreter(small_config, tmp_path):
    """A $PYTHON that cannot import the requirements (e.g. the .venv not activated) stops the launch."""
    isolated = tmp_path / "python"  # the same interpreter without site-packages or PYTHONPATH: no card_megatron
    isolated.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    isolated.chmod(0o755)
    env = {**_local_env(GPUS_PER_NODE="0", PROCS_PER_NODE="2"), "PYTHON": str(isolated)}
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", small_config], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "dry run: nothing launched" not in r.stdout
    assert f"PYTHON={isolated} cannot import the project's requirements" in r.stderr
    assert "No module named 'card_megatron'" in r.stderr and "set PYTHON=" in r.stderr


@pytest.mark.slow  # slurm/pretrain.sh runs the launch check (imports torch): ~5 s
def test_pretrain_refuses_to_run_outside_slurm_and_without_config(small_config):
    r = subprocess.run(
        ["bash", PRETRAIN, small_config, "parallel.tensor_model_parallel_size=1"],
        env=_local_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "not inside a SLURM job" in r.stderr
    r = subprocess.run(
        ["bash", PRETRAIN, "--dry-run", "no/such.yaml"], env=_local_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "config file not found: no/such.yaml" in r.stderr


def test_preprocess_submitter_checks_inputs_before_submitting(tmp_path):
    listed = _write(tmp_path / "a.txt", "alpha\n")
    env = _local_env(PREPROCESS_TOOL=FAKE_PREPROCESS)
    bad_list = _write(tmp_path / "bad.list", f"{listed}\n{tmp_path}/missing.txt\n")
    r = subprocess.run(
        ["bash", PREPROCESS, bad_list, str(tmp_path / "out")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and f"input listed in {bad_list} not found: {tmp_path}/missing.txt" in r.stderr
    good_list = _write(tmp_path / "good.list", f"# comment\n\n  {listed}  \n")
    r = subprocess.run(
        ["bash", PREPROCESS, good_list, str(tmp_path / "out"), "--train-tokenizer"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "--train-tokenizer would train one tokenizer per shard" in r.stderr
    assert not os.path.exists(tmp_path / "out_shards")


def test_connect_failure_is_bounded_and_names_node_and_address(tmp_path):
    """A rank whose peer never comes fails after the process-group timeout, naming its node and the rendezvous."""
    from tests.distributed import clean_env, free_port

    port = free_port()
    script = (
        "import datetime, torch.distributed as dist\n"
        "from card_megatron.parallel.connect import explain_connect_failure\n"
        "with explain_connect_failure('gloo', 0.05):\n"
        f"    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=2,\n"
        "                            timeout=datetime.timedelta(seconds=3))\n"
    )
    env = clean_env(
        RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLURMD_NODENAME="node-a", GLOO_SOCKET_IFNAME="lo"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0 and time.monotonic() - t0 < 60, r.stderr
    assert (
        f"ConnectError: rank 0 on node node-a could not connect its gloo process group; "
        f"rendezvous 127.0.0.1:{port}; "
        "GLOO_SOCKET_IFNAME=lo"
    ) in r.stderr, r.stderr
    assert "timeout 0.05 min (parallel.distributed_timeout_minutes)" in r.stderr


# --------------------------------------------------------------------------- real SLURM


@pytest.mark.slurm
def test_cluster_runs_a_batch_job_with_srun_steps(slurm, tmp_path):
    job = slurm.sbatch(["-n2", "-o", str(tmp_path / "out.%j"), "--wrap", "srun -n2 hostname"], cwd=tmp_path)
    info = slurm.wait_job(job, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert _read(tmp_path / f"out.{job}").split() == [slurm.hostname] * 2


@pytest.mark.slurm
def test_gpu_header_is_overridden_by_gres_none_on_a_cpu_cluster(slurm, small_config):
    """The template asks for GPUs; a CPU-only cluster rejects that unless --gres=none replaces it."""
    base = ["sbatch", "--test-only", "-N1", "-n1", "-c1", PRETRAIN, small_config]
    r = slurm.run(base, cwd=ROOT, check=False)
    assert r.returncode != 0 and "Invalid generic resource" in r.stderr
    r = slurm.run(base[:1] + ["--gres=none"] + base[1:], cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.slurm
def test_usr1_saves_requeues_and_resumes_with_fake_trainer(slurm, small_config, tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "job-%j.out"
    train_iters = 40
    job = slurm.sbatch(
        [
            "--gres=none",
            "-N1",
            "-n1",
            "-c2",
            "--time=5",
            "-o",
            str(out),
            PRETRAIN,
            small_config,
            f"train.run_dir={run_dir}",
            f"train.train_iters={train_iters}",
        ],
        env={
            "PYTHON": sys.executable,
            "TRAIN_SCRIPT": FAKE_TRAINER,
            "GPUS_PER_NODE": "0",
            "PROCS_PER_NODE": "2",
            "FAKE_STEP_SECONDS": "0.2",
        },
        cwd=ROOT,
    )
    log = str(out).replace("%j", str(job))
    _wait_for(
        lambda: len(_metrics(run_dir)) >= 3 or slurm.job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
        90,
        "the fake trainer to make progress",
    )
    assert len(_metrics(run_dir)) >= 3, _read(log) if os.path.exists(log) else slurm.logs()
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    info = slurm.wait_job(job, timeout=120)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", info

    saved = int(re.search(r"checkpoint saved at step (\d+); requeueing job", text).group(1))
    assert 3 <= saved < train_iters
    assert f"resuming    from {run_dir}/checkpoints/step_{saved:08d}" in text
    assert "restart 0 on" in text and "restart 1 on" in text  # both attempts in one appended log

    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert steps == list(range(1, train_iters + 1)), steps  # each step once: resumed where it stopped
    assert {m["restart"] for m in metrics if m["step"] <= saved} == {0}
    assert {m["restart"] for m in metrics if m["step"] > saved} == {1}
    assert {m["world_size"] for m in metrics} == {2}
    assert _read(run_dir / "checkpoints" / "latest").strip() == f"step_{train_iters:08d}"
    assert (run_dir / "finished").exists()
    assert not (run_dir / "preempted").exists() and not (run_dir / "SAVE_AND_EXIT").exists()
    revision = _read(run_dir / "git_revision.txt").strip()
    assert revision == "unknown" or re.fullmatch(r"[0-9a-f]{40}", revision)
    for restart in (0, 1):  # torchrun's per-rank logs of both attempts, both local ranks
        rank_logs = sorted(
            os.path.relpath(os.path.join(d, f), run_dir)
            for d, _, files in os.walk(run_dir / "logs" / f"job{job}-restart{restart}" / "node0")
            for f in files
            if f == "stdout.log"
        )
        assert [p.split(os.sep)[-2] for p in rank_logs] == ["0", "1"], rank_logs


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_requeues_and_scancel_does_not(slurm, small_config, tmp_path):
    """SLURM's own --signal=B:USR1@T before the time limit reaches the trap; scancel stops for good."""
    run_dir = tmp_path / "run"
    out = tmp_path / "job-%j.out"
    # A 1-minute limit with USR1 due 40 s before it; SLURM checks limits every ~30 s.
    job = slurm.sbatch(
        [
            "--gres=none",
            "-N1",
            "-n1",
            "-c2",
            "--time=1",
            "--signal=B:USR1@40",
            "-o",
            str(out),
            PRETRAIN,
            small_config,
            f"train.run_dir={run_dir}",
            "train.train_iters=100000",
        ],
        env={
            "PYTHON": sys.executable,
            "TRAIN_SCRIPT": FAKE_TRAINER,
            "GPUS_PER_NODE": "0",
            "PROCS_PER_NODE": "2",
            "FAKE_STEP_SECONDS": "0.1",
        },
        cwd=ROOT,
    )
    log = str(out).replace("%j", str(job))
    # Cancel once the requeued attempt's trainer runs, not when the batch script announces it: a scancel that
    # lands while srun is still launching the step (12 s on a loaded machine) leaves the step's I/O to
    # slurmstepd's 60 s abandon timeout, and the job COMPLETING for that long (seen once under load).
    _wait_for(
        lambda: os.path.exists(log) and "fake_trainer rank 0: resuming from" in _read(log),
        100,
        "the requeued attempt's trainer to resume",
    )
    slurm.run(["scancel", str(job)])
    info = slurm.wait_job(job, timeout=100)  # KillWait (10 s), plus slurmstepd's 60 s I/O timeout if it applies
    text = _read(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", (info, text)
    saved = int(re.search(r"checkpoint saved at step (\d+); requeueing job", text).group(1))
    assert text.index("got USR1") < text.index("requeueing") < text.index("restart 1 on")
    assert f"resuming    from {run_dir}/checkpoints/step_{saved:08d}" in text
    assert text.count("requeueing") == 1


@pytest.mark.slurm
def test_failing_trainer_fails_the_job_without_requeue(slurm, small_config, tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "job-%j.out"
    job = slurm.sbatch(
        [
            "--gres=none",
            "-N1",
            "-n1",
            "-c2",
            "--time=5",
            "-o",
            str(out),
            PRETRAIN,
            small_config,
            f"train.run_dir={run_dir}",
        ],
        env={
            "PYTHON": sys.executable,
            "TRAIN_SCRIPT": FAKE_TRAINER,
            "GPUS_PER_NODE": "0",
            "PROCS_PER_NODE": "2",
            "FAKE_EXIT_CODE": "3",
        },
        cwd=ROOT,
    )
    info = slurm.wait_job(job, timeout=60)
    text = _read(str(out).replace("%j", str(job)))
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    assert "training failed (status 1)" in text  # torchrun reports a failed worker as 1
    assert not (run_dir / "finished").exists()


@pytest.mark.slurm
def test_preprocess_array_then_merge(slurm, tmp_path):
    inputs = [_write(tmp_path / f"in{i}.txt", f"document {i}\n" * (i + 1)) for i in range(3)]
    listing = _write(tmp_path / "inputs.list", "# three files\n" + "\n".join(inputs) + "\n")
    out = tmp_path / "corpus"
    calls = tmp_path / "calls.txt"
    r = slurm.run(
        ["bash", PREPROCESS, listing, str(out), "--tokenizer-model", "tok.model"],
        env={
            "PYTHON": sys.executable,
            "PREPROCESS_TOOL": FAKE_PREPROCESS,
            "FAKE_PREPROCESS_LOG": str(calls),
            "SBATCH_OPTIONS": "--cpus-per-task=1 --time=5",
        },
        cwd=tmp_path,
    )
    ids = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    array_id, merge_id = int(ids["ARRAY_JOB_ID"]), int(ids["MERGE_JOB_ID"])
    info = slurm.wait_job(merge_id, timeout=90)
    assert info["JobState"] == "COMPLETED", (info, slurm.logs())
    for i, path in enumerate(inputs):
        assert _read(f"{out}_shards/shard_{i:05d}_text_document.bin") == _read(path)
        task = slurm.job_info(f"{array_id}_{i}")
        assert task["JobState"] == "COMPLETED" and task["ArrayTaskId"] == str(i), task
    assert _read(f"{out}_text_document.bin") == "".join(_read(p) for p in inputs)
    shard_calls = sorted(line for line in _read(calls).splitlines() if line.startswith("--input"))
    assert shard_calls == [
        f"--input {path} --output-prefix {out}_shards/shard_{i:05d} --workers 1 --tokenizer-model tok.model"
        for i, path in enumerate(inputs)
    ]
    merge_calls = [line for line in _read(calls).splitlines() if line.startswith("--merge")]
    assert merge_calls == [
        "--merge "
        + " ".join(f"{out}_shards/shard_{i:05d}_text_document" for i in range(3))
        + f" --output-prefix {out}_text_document"
    ]


@pytest.mark.slurm
def test_preprocess_failed_shard_cancels_merge(slurm, tmp_path):
    inputs = [_write(tmp_path / "ok.txt", "fine\n"), _write(tmp_path / "bad.txt", "FAIL here\n")]
    listing = _write(tmp_path / "inputs.list", "\n".join(inputs) + "\n")
    out = tmp_path / "corpus"
    r = slurm.run(
        ["bash", PREPROCESS, listing, str(out)],
        env={
            "PYTHON": sys.executable,
            "PREPROCESS_TOOL": FAKE_PREPROCESS,
            "SBATCH_OPTIONS": "--cpus-per-task=1 --time=5",
        },
        cwd=tmp_path,
    )
    ids = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    array_id, merge_id = int(ids["ARRAY_JOB_ID"]), int(ids["MERGE_JOB_ID"])
    assert slurm.wait_job(f"{array_id}_1", timeout=60)["JobState"] == "FAILED"
    info = slurm.wait_job(merge_id, timeout=60)
    assert info["JobState"] == "CANCELLED", info
    assert not os.path.exists(f"{out}_text_document.bin")


# --------------------------------------------------------------------------- end to end, real trainer


# configs/tiny-cpu.yaml made smaller still, so that a 2-process CPU job takes seconds per 10 steps.
SMALLER = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.seq_length=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.eval_iters=2",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.lr_warmup_iters=2",
    "data.split=90,10,0",
]


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus) -> list[str]:
    """Overrides pointing at the suite's tiny corpus and tokenizer (``tiny_corpus``, tests/conftest.py)."""
    prefix, tokenizer = tiny_corpus
    return [f"data.data_path={prefix}", f"data.tokenizer_model={tokenizer}"]


def _submit_tiny(slurm, tmp_path, data_overrides, *overrides: str) -> tuple[int, str, str]:
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "job-%j.out")
    job = slurm.sbatch(
        [
            "--gres=none",
            "-N1",
            "-n1",
            "-c2",
            "--time=10",
            "-o",
            log,
            PRETRAIN,
            TINY_CONFIG,
            *SMALLER,
            f"train.run_dir={run_dir}",
            *data_overrides,
            *overrides,
        ],
        env={"PYTHON": sys.executable, "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "2", "WANDB_MODE": "offline"},
        cwd=ROOT,
    )
    return job, run_dir, log.replace("%j", str(job))


def _checkpoint_step(run_dir: str) -> int:
    name = _read(os.path.join(run_dir, "checkpoints", "latest")).strip()
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", name)), name
    return int(re.search(r"(\d+)$", name).group(1))


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_cpu_training_job_learns_and_checkpoints(slurm, tiny_data, tmp_path):
    iters = 30
    job, run_dir, log = _submit_tiny(
        slurm, tmp_path, tiny_data, f"train.train_iters={iters}", "train.save_interval=10", "train.log_interval=5"
    )
    info = slurm.wait_job(job, timeout=300)
    text = _read(log) if os.path.exists(log) else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert os.path.exists(os.path.join(run_dir, "finished"))
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert _checkpoint_step(run_dir) == iters
    metrics = _metrics(run_dir)
    assert len(metrics) >= 2 and metrics[-1]["step"] == iters, metrics
    assert metrics[-1]["loss"] < metrics[0]["loss"], [(m["step"], m["loss"]) for m in metrics]


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_cpu_training_job_survives_usr1_requeue(slurm, tiny_data, tmp_path):
    iters = 40
    job, run_dir, log = _submit_tiny(slurm, tmp_path, tiny_data, f"train.train_iters={iters}", "train.log_interval=1")
    _wait_for(
        lambda: len(_metrics(run_dir)) >= 3 or slurm.job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
        240,
        "training progress",
    )
    before = _metrics(run_dir)
    assert 3 <= len(before) and before[-1]["step"] < iters, _read(log)[-5000:]
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    info = slurm.wait_job(job, timeout=300)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Restarts"] == "1", info
    saved = int(re.search(r"checkpoint saved at step (\d+); requeueing job", text).group(1))
    assert before[-1]["step"] <= saved < iters
    assert re.search(rf"resuming    from .*step_0*{saved}\b", text), text[-5000:]
    steps = [m["step"] for m in _metrics(run_dir)]
    # The second attempt continues after the saved step: nothing before it is logged twice.
    assert steps == sorted(set(steps)) and steps[-1] == iters, steps
    assert saved in steps and saved + 1 in steps, steps
    assert os.path.exists(os.path.join(run_dir, "finished"))
    assert _checkpoint_step(run_dir) == iters


# --------------------------------------------------------------------------- two nodes
# A real two-node cluster on this machine: each node is a network namespace with its own
# address on a private bridge and its own slurmd (tests/slurm_cluster.py, TwoNodeCluster).
# The runs are tiny (training_runs.TINY, 12 steps) so the whole section takes a few minutes.

TWO_NODE_ITERS = 12
TWO_NODE_ENV = {"PYTHON": sys.executable, "GPUS_PER_NODE": "0", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}


@pytest.fixture(scope="session")
def slurm2(tmp_path_factory):
    """A private two-node SLURM cluster for the session; everything it made is removed at the end."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    why = netns_unavailable()
    if why:
        pytest.skip(f"no two-node cluster on this machine: {why}")
    cluster = TwoNodeCluster(str(tmp_path_factory.mktemp("slurm2")), cpus=2)
    cluster.start()
    yield cluster
    cluster.stop()
    assert not cluster.leftovers(), cluster.leftovers()


def _submit_two_nodes(
    cluster, run_dir: str, corpus, *extra: str, procs_per_node: int = 1, env: dict | None = None
) -> tuple[int, str]:
    """``sbatch -N2 slurm/pretrain.sh`` on the tiny model; returns (job id, batch log path)."""
    log = os.path.join(os.path.dirname(run_dir), "job-%j.out")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    job = cluster.sbatch(
        [
            "--gres=none",
            "-N2",
            "-c2",
            "--time=10",
            "-o",
            log,
            PRETRAIN,
            TINY_CONFIG,
            *overrides(corpus, run_dir, TWO_NODE_ITERS, *extra),
        ],
        env={**TWO_NODE_ENV, "PROCS_PER_NODE": str(procs_per_node), **(env or {})},
        cwd=ROOT,
    )
    return job, log.replace("%j", str(job))


def _finished_ok(cluster, job: int, log: str, timeout: float = 300, restarts: str = "0") -> str:
    info = cluster.wait_job(job, timeout=timeout)
    text = _read(log) if os.path.exists(log) else f"(no {log})\n{cluster.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-6000:])
    assert info["Restarts"] == restarts, (info, text[-6000:])
    return text


def _both_nodes_used(cluster, text: str, attempts: int = 1) -> None:
    """Each node picked its own route (eth1) to the first node's address, in every attempt."""
    first = cluster.addr_of(cluster.node_names[0])
    assert f"rendezvous  {first}:" in text, text[:3000]
    for rank, node in enumerate(cluster.node_names):
        line = f"pretrain.sh: node {rank} ({node}) reaches {first} through eth1"
        assert text.count(line) == attempts, (line, text[-6000:])


@pytest.fixture(scope="session")
def two_node_reference(slurm2, tiny_corpus, tmp_path_factory):
    """The uninterrupted runs the two-node tests compare with: one process, and 2 nodes x 1 process."""
    base = tmp_path_factory.mktemp("two_node_reference")
    single = str(base / "single")
    train(1, overrides(tiny_corpus, single, TWO_NODE_ITERS))  # global batch 8 = micro 4 x 2 accumulation
    run_dir = str(base / "dp" / "run")
    job, log = _submit_two_nodes(slurm2, run_dir, tiny_corpus, "train.save_interval=4")
    text = _finished_ok(slurm2, job, log)
    return {"single": losses(single), "dp": losses(run_dir), "log": text, "run_dir": run_dir}


@pytest.mark.slurm
def test_two_node_cluster_is_two_hosts_and_leaves_nothing_behind(tmp_path):
    """Each node has its own address and name; stopping the cluster removes every namespace, link, daemon and
    host entry."""
    if missing_programs() or netns_unavailable():
        pytest.skip(f"no two-node cluster here: {missing_programs() or netns_unavailable()}")
    cluster = TwoNodeCluster(str(tmp_path / "cluster"), cpus=2).start()
    try:
        job = cluster.sbatch(
            [
                "-N2",
                "-n2",
                "-o",
                str(tmp_path / "out.%j"),
                "--wrap",
                "srun bash -c 'echo $SLURMD_NODENAME $(hostname -I)'",
            ],
            cwd=tmp_path,
        )
        info = cluster.wait_job(job, timeout=60)
        assert info["JobState"] == "COMPLETED", (info, cluster.logs())
        seen = sorted(tuple(line.split()) for line in _read(tmp_path / f"out.{job}").splitlines())
        assert seen == sorted((name, addr) for name, addr in cluster.nodes)
        assert len({addr for _, addr in cluster.nodes}) == 2
        assert cluster.leftovers()  # while it runs, the namespaces, links and host entries exist
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.tag not in netns and cluster.tag not in _read("/etc/hosts")


@pytest.mark.slurm
def test_two_node_leftovers_of_a_killed_session_are_swept():
    """Names of a session whose process is gone (namespace, link, host entry) are removed by the next one."""
    if missing_programs() or netns_unavailable():
        pytest.skip(f"no two-node cluster here: {missing_programs() or netns_unavailable()}")
    from slurm_cluster import _edit_hosts, sweep_stale

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is now free: a "session" that was killed
    tag = f"cmt{gone.pid}a"
    subprocess.run(["ip", "netns", "add", f"{tag}-n1"], check=True)
    subprocess.run(["ip", "link", "add", f"{tag}br", "type", "bridge"], check=True)
    with open("/etc/hosts", "a") as f:
        f.write(f"10.213.254.11 {tag}n1 # {tag} card_megatron two-node test\n")
    try:
        sweep_stale()
        assert f"{tag}-n1" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", f"{tag}br"], capture_output=True).returncode != 0
        assert tag not in _read("/etc/hosts")
    finally:
        subprocess.run(["ip", "netns", "del", f"{tag}-n1"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{tag}br"], capture_output=True)
        _edit_hosts(drop_tag=tag)


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_data_parallel_matches_single_process(slurm2, two_node_reference):
    """sbatch -N2: one rank per node (DP=2 across the nodes) gives the single-process losses at global batch 8."""
    ref = two_node_reference
    _both_nodes_used(slurm2, ref["log"])
    assert "layout      2 node(s) x 1 process(es) = world size 2" in ref["log"]
    assert "interface   eth1 on this node (GLOO_SOCKET_IFNAME; each node takes its route to" in ref["log"]
    assert sorted(ref["dp"]) == list(range(1, TWO_NODE_ITERS + 1))
    for step, loss in ref["single"].items():
        assert math.isclose(ref["dp"][step], loss, rel_tol=LOSS_REL_TOL), (step, ref["dp"][step], loss)
    assert ref["dp"][TWO_NODE_ITERS] < ref["dp"][1]
    assert os.path.exists(os.path.join(ref["run_dir"], "finished"))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_preemption_resumes_on_both_nodes(slurm2, two_node_reference, tiny_corpus, tmp_path):
    """USR1 to the batch shell: checkpoint, requeue, resume on both nodes; the losses equal the uninterrupted run."""
    run_dir = str(tmp_path / "run")
    job, log = _submit_two_nodes(slurm2, run_dir, tiny_corpus)
    _wait_for(
        lambda: len(_metrics(run_dir)) >= 2 or slurm2.job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
        180,
        "two-node training progress",
    )
    slurm2.run(["scancel", "--signal=USR1", "--batch", str(job)])
    text = _finished_ok(slurm2, job, log, restarts="1")
    saved = int(re.search(r"checkpoint saved at step (\d+); requeueing job", text).group(1))
    assert 2 <= saved < TWO_NODE_ITERS, text[-4000:]
    assert re.search(rf"resuming    from .*step_0*{saved}\b", text)
    _both_nodes_used(slurm2, text, attempts=2)
    got, expected = losses(run_dir), two_node_reference["dp"]
    assert sorted(got) == list(range(1, TWO_NODE_ITERS + 1))
    for step in range(saved + 1, TWO_NODE_ITERS + 1):  # exact resume: same layout, same losses, bit for bit
        assert got[step] == expected[step], (step, got[step], expected[step])


def _node_trainers(cluster, node: str) -> list[int]:
    """PIDs of the training processes (torchrun's workers, not torchrun) running on ``node``."""
    pids = []
    for pid in cluster.node_pids(node):
        try:
            argv = _read(f"/proc/{pid}/cmdline").split("\0")
        except OSError:
            continue
        if "card_megatron.train" in argv and "torch.distributed.run" not in argv:
            pids.append(pid)
    return pids


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_lost_node_requeues_from_last_checkpoint(slurm2, two_node_reference, tiny_corpus, tmp_path):
    """The second node's trainers are killed mid-run: the job says which node failed, requeues itself and resumes
    from the last complete checkpoint, losing at most train.save_interval steps; the losses equal the uninterrupted
    run."""
    save_interval = 4
    run_dir = str(tmp_path / "run")
    job, log = _submit_two_nodes(slurm2, run_dir, tiny_corpus, f"train.save_interval={save_interval}")
    latest = os.path.join(run_dir, "checkpoints", "latest")
    victim = slurm2.node_names[1]

    def past_a_checkpoint():
        steps = [m["step"] for m in _metrics(run_dir)]
        return os.path.exists(latest) and steps and steps[-1] > _checkpoint_step(run_dir)

    _wait_for(
        lambda: past_a_checkpoint() or slurm2.job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
        180,
        "a step after the first checkpoint",
        poll=0.05,
    )
    pids = _node_trainers(slurm2, victim)
    killed_after = max(m["step"] for m in _metrics(run_dir))
    assert pids and killed_after < TWO_NODE_ITERS, (pids, killed_after, _read(log)[-4000:])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    _wait_for(
        lambda: "requeueing job" in _read(log) or slurm2.job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
        120,
        "the job to notice the lost node",
    )
    noticed = time.monotonic() - t0
    text = _finished_ok(slurm2, job, log, restarts="1")
    assert noticed < 60, noticed  # ended promptly, not at the time limit
    # The victim is named (its peers, which lost their connections at the same moment, may be listed too).
    assert re.search(rf"training failed \(status \d+\) on [^\n]*node 1 \({victim}, status \d+\)", text), text[-6000:]
    resumed = int(re.search(r"this attempt reached checkpoint step_0*(\d+) .*requeueing job", text).group(1))
    assert killed_after - save_interval <= resumed <= killed_after, (resumed, killed_after)
    assert re.search(rf"resuming    from .*step_0*{resumed}\b", text)
    _both_nodes_used(slurm2, text, attempts=2)
    got, expected = losses(run_dir), two_node_reference["dp"]
    assert sorted(got) == list(range(1, TWO_NODE_ITERS + 1))
    for step in range(resumed + 1, TWO_NODE_ITERS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert os.path.exists(os.path.join(run_dir, "finished"))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_unreachable_peer_fails_in_bounded_time_naming_node_and_address(slurm2, tiny_corpus, tmp_path):
    """GLOO_SOCKET_IFNAME=lo (what a host name resolving to loopback does): the ranks advertise 127.0.0.1 and cannot
    connect; the job fails within the process-group timeout, naming the node and the address tried, and is not
    requeued."""
    run_dir = str(tmp_path / "run")
    t0 = time.monotonic()
    job, log = _submit_two_nodes(
        slurm2, run_dir, tiny_corpus, "parallel.distributed_timeout_minutes=1", env={"GLOO_SOCKET_IFNAME": "lo"}
    )
    info = slurm2.wait_job(job, timeout=150)
    elapsed = time.monotonic() - t0
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text[-6000:])
    assert elapsed < 150
    assert "interface   GLOO_SOCKET_IFNAME=lo (set by you, used on every node)" in text
    first = slurm2.addr_of(slurm2.node_names[0])
    m = re.search(
        r"error: rank (\d) on node (\S+) could not connect its gloo process group; "
        rf"rendezvous {re.escape(first)}:\d+; address tried 127\.0\.0\.1:\d+; GLOO_SOCKET_IFNAME=lo",
        text,
    )
    assert m and m.group(2) in slurm2.node_names, text[-6000:]
    assert "timeout 1 min (parallel.distributed_timeout_minutes)" in text
    assert "not requeued: no new checkpoint" in text


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_tensor_parallel_inside_data_parallel_across(slurm2, two_node_reference, tiny_corpus, tmp_path):
    """2 nodes x 2 processes, TP=2 inside each node and DP=2 across them: the single-process losses."""
    run_dir = str(tmp_path / "run")
    job, log = _submit_two_nodes(
        slurm2, run_dir, tiny_corpus, "parallel.tensor_model_parallel_size=2", procs_per_node=2
    )
    text = _finished_ok(slurm2, job, log, timeout=400)
    assert "world size 4 = tensor 2 x pipeline 1 x data 2" in text
    _both_nodes_used(slurm2, text)
    got, expected = losses(run_dir), two_node_reference["single"]
    assert sorted(got) == list(range(1, TWO_NODE_ITERS + 1))
    for step, loss in expected.items():
        assert math.isclose(got[step], loss, rel_tol=LOSS_REL_TOL), (step, got[step], loss)


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_preprocess_array_matches_single_process(slurm2, tiny_corpus, tmp_path):
    """slurm/preprocess.sh: one array task per node, then the merge; the result is byte-identical to one process."""
    _, tokenizer = tiny_corpus
    import pydoc_data.topics

    texts = [t.replace("\n", " ") for t in pydoc_data.topics.topics.values()]
    inputs = [_write(tmp_path / f"part{i}.txt", "\n".join(texts[i::2]) + "\n") for i in range(2)]
    listing = _write(tmp_path / "inputs.list", "\n".join(inputs) + "\n")
    single = str(tmp_path / "single")
    subprocess.run(
        [
            sys.executable,
            PREPROCESS_TOOL,
            "--input",
            *inputs,
            "--tokenizer-model",
            tokenizer,
            "--output-prefix",
            single,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
        env=_local_env(PYTHONPATH=ROOT),
    )
    out = str(tmp_path / "corpus")
    # Both nodes idle and both tasks eligible at the same instant (--begin), so the scheduler places them in
    # one pass, one per node. Without this a node still completing an earlier test's job left one task
    # waiting, and it started on the first node once that node's task had finished (a shard takes < 1 s).
    slurm2.wait_idle()
    r = slurm2.run(
        ["bash", PREPROCESS, listing, out, "--tokenizer-model", tokenizer],
        env={
            "PYTHON": sys.executable,
            "PYTHONPATH": ROOT,
            "PREPROCESS_TOOL": PREPROCESS_TOOL,
            "SBATCH_OPTIONS": "--cpus-per-task=2 --time=5 --begin=now+2",
        },
        cwd=tmp_path,
    )
    ids = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    info = slurm2.wait_job(int(ids["MERGE_JOB_ID"]), timeout=240)
    assert info["JobState"] == "COMPLETED", (info, slurm2.logs())
    hosts = {slurm2.job_info(f"{ids['ARRAY_JOB_ID']}_{i}")["BatchHost"] for i in range(2)}
    assert hosts == set(slurm2.node_names)  # a whole node each: the two shards ran on different nodes
    for ext in ("bin", "idx"):
        with open(f"{out}_text_document.{ext}", "rb") as a, open(f"{single}_text_document.{ext}", "rb") as b:
            assert a.read() == b.read(), ext
