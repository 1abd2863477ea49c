"""Private SLURM clusters for tests (Debian's ``slurm-wlm`` + ``munge``): one node, or two.

:class:`SlurmCluster` writes a ``slurm.conf`` and a munge key into a temporary
directory, starts its own ``munged`` (own socket), ``slurmctld`` and ``slurmd``
(own free ports, own state/spool/log dirs) in the foreground as child processes,
and stops exactly those processes, by PID, in :meth:`stop`. Nothing in ``/etc`` or
``/run`` is touched; commands reach this cluster through ``SLURM_CONF`` (see
:attr:`SlurmCluster.env`), and ``AuthInfo=socket=...`` points every SLURM component
at the private munge socket.

:class:`TwoNodeCluster` adds two compute nodes in network namespaces of their own on a
private bridge (see its docstring); it changes /etc/hosts and the network configuration
while it runs and undoes both in :meth:`TwoNodeCluster.stop`.

Run ``PYTHONPATH=. python tests/slurm_cluster.py [--two-nodes]`` (from the repository root,
as root) to bring a cluster up by hand: it prints the ``export SLURM_CONF=...`` line and keeps
the cluster up until Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

from tests.distributed import LAUNCHER_VARS

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")


def missing_programs() -> list[str]:
    """Names of the SLURM/munge programs this fixture needs and cannot find."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=path) is None]


def _which(prog: str) -> str:
    found = shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, prog
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free now, avoiding SLURM's defaults 6817-6819."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port not in (6817, 6818, 6819):
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return max(256, int(kb / 1024 * 0.8))  # below the detected size, or slurmd drains


class SlurmCluster:
    """One controller and one compute node on this host, private to the test session."""

    def __init__(self, base_dir: Optional[str] = None, cpus: Optional[int] = None) -> None:
        self.base = base_dir or tempfile.mkdtemp(prefix="slurm-test-")
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.ctld_addr = "127.0.0.1"
        self.nodes: list[tuple[str, str]] = [(self.hostname, "127.0.0.1")]  # (NodeName, NodeAddr)
        self.conf_path = os.path.join(self.base, "etc", "slurm.conf")
        # Unix socket paths (munge's, slurmd's and slurmstepd's in the spool) must stay under 108
        # bytes, so they live in a short directory of their own, not under a long pytest tmp path.
        self.sockets = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")
        self.munge_socket = os.path.join(self.sockets, "munge.socket")
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ config
    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM client commands (and jobs) aimed at this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf_path
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        for k in list(env):  # a test run inside a SLURM job must not leak that job's settings
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del env[k]
        for k in LAUNCHER_VARS:  # nor a torch.distributed launcher's (sbatch exports the environment)
            env.pop(k, None)
        return env

    def _write_config(self) -> None:
        d = {name: os.path.join(self.base, name) for name in ("etc", "munge", "state", "log", "run")}
        d["spool"] = os.path.join(self.sockets, "spool")
        for path in [*d.values(), *(os.path.join(d["spool"], name) for name, _ in self.nodes)]:
            os.makedirs(path, mode=0o700, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        self.ctld_port, self.slurmd_port = ctld_port, slurmd_port
        key = os.path.join(d["munge"], "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        conf = f"""# Generated by tests/slurm_cluster.py for one test session.
ClusterName=cardtest
SlurmctldHost={self.hostname}({self.ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Private munge socket; cred_expire also sets how long a requeued job waits to restart.
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={d["state"]}
SlurmdSpoolDir={d["spool"]}/%n
SlurmctldPidFile={d["run"]}/slurmctld.pid
SlurmdPidFile={d["run"]}/slurmd-%n.pid
SlurmctldLogFile={d["log"]}/slurmctld.log
SlurmdLogFile={d["log"]}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
SlurmdParameters=config_overrides
"""
        memory = _real_memory_mb()
        for name, addr in self.nodes:
            conf += f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN\n"
        names = ",".join(n for n, _ in self.nodes)
        conf += f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP\n"
        with open(self.conf_path, "w") as f:
            f.write(conf)
        self._dirs = d
        self._munge_key = key

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.base, "log", f"{name}.stdout"), "ab")
        # start_new_session: keep the daemons out of pytest's process group (Ctrl-C);
        # _die_with_parent: no daemon outlives a test process that was killed.
        self._procs[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Starts munged, slurmctld and slurmd; returns once the node is idle."""
        self._write_config()
        d = self._dirs
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={self._munge_key}",
                    f"--log-file={d['log']}/munged.log",
                    f"--pid-file={d['run']}/munged.pid",
                    f"--seed-file={d['munge']}/munged.seed",
                ],
            )
            self._wait_for(lambda: os.path.exists(self.munge_socket), 15, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf_path])
            self._wait_for(self._ctld_up, 30, "slurmctld to answer")
            for name, _ in self.nodes:
                self._spawn(
                    f"slurmd-{name}",
                    [*self._node_prefix(name), _which("slurmd"), "-D", "-f", self.conf_path, "-N", name],
                )
            self._wait_for(self._nodes_idle, timeout, "the nodes to become idle")
        except Exception:
            self.stop()
            raise
        return self

    def _ctld_up(self) -> bool:
        r = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True)
        return "UP" in r.stdout

    def _node_prefix(self, name: str) -> list[str]:
        """The command that runs node ``name``'s slurmd where that node lives (none: here)."""
        return []

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        states = r.stdout.split()
        return len(states) == len(self.nodes) and all(s.startswith("idle") for s in states)

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Returns once every node is idle (a previous test's job may still be completing on one)."""
        self._wait_for(self._nodes_idle, timeout, "the nodes to become idle")

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        log_dir = os.path.join(self.base, "log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines = f.readlines()[-tail:]
            out.append(f"--- {name}\n" + "".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancels this cluster's jobs, then stops its daemons by PID (slurmd first)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], env=self.env, capture_output=True)
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        slurmds = [name for name in self._procs if name.startswith("slurmd-")]
        for name in (*slurmds, "slurmctld", "munged"):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        shutil.rmtree(self.sockets, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def run(
        self,
        argv: list[str],
        env: Optional[dict] = None,
        cwd: Optional[str] = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Runs a client command against this cluster; returns the completed process."""
        full_env = self.env
        full_env.update(env or {})
        r = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        """Submits a batch job; returns its job id."""
        r = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: "int | str") -> dict[str, str]:
        """``scontrol show job`` as a dict of its ``Key=Value`` fields ({} once forgotten)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0:
            return {}
        fields = {}
        for token in r.stdout.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_job(
        self,
        job_id: "int | str",
        timeout: float = 120,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"),
    ) -> dict[str, str]:
        """Waits until the job reaches one of ``states``; returns its scontrol fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s: {info}\n{self.logs()}")


# --------------------------------------------------------------------------- two nodes

_HOSTS_FILE = "/etc/hosts"
_OWNED = re.compile(r"^cmt(\d+)")  # names this fixture creates carry the creating process's id


def _ip(*args: str, netns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *args] if netns is None else ["nsenter", f"--net=/run/netns/{netns}", "ip", *args]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _edit_hosts(drop_tag: Optional[str] = None, add: str = "", drop_dead: bool = False) -> None:
    """Removes /etc/hosts lines marked ``# cmt<pid>`` (that pid's, or every dead pid's); appends ``add``.

    Rewritten in place (not renamed over): /etc/hosts may be a bind mount.
    """
    with open(_HOSTS_FILE) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        m = re.search(r"# (cmt(\d+)[a-z]) card_megatron two-node test$", line.rstrip("\n"))
        if m and (m.group(1) == drop_tag or (drop_dead and not _pid_alive(int(m.group(2))))):
            continue
        kept.append(line)
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    if kept != lines or add:
        with open(_HOSTS_FILE, "w") as f:
            f.write("".join(kept) + add)


def netns_unavailable() -> Optional[str]:
    """Why this machine cannot host the two-node cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the two-node cluster needs root (network namespaces, /etc/hosts, SlurmUser=root)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [p for p in ("ip", "nsenter") if shutil.which(p, path=path) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install iproute2 util-linux)"
    probe = f"cmt{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace here (ip netns add: {r.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    if not os.access(_HOSTS_FILE, os.W_OK):
        return f"{_HOSTS_FILE} is not writable (the node names must resolve)"
    return None


def sweep_stale() -> None:
    """Removes namespaces, links and host entries left by a killed earlier session (its pid is gone)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OWNED.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_pids([int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()])
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _OWNED.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
    _edit_hosts(drop_dead=True)


class TwoNodeCluster(SlurmCluster):
    """A controller and two compute nodes, each node in a network namespace of its own.

    The namespaces hang off a private bridge in the root namespace, each with an ``eth1``
    of its own address, as two machines on a cluster network would; host names for the
    nodes go into /etc/hosts. ``slurmctld`` runs in the root namespace, each ``slurmd`` in
    its node's namespace (entered with ``nsenter --net=``, which keeps /sys and its cgroup
    file system as they are; ``ip netns exec`` would remount /sys without it). The file
    system is shared, so run directories work as on a cluster with a shared file system.
    Every name carries this process's id and a letter per cluster (``cmt<pid>a``): :meth:`stop`
    removes exactly what :meth:`start` made, and :func:`sweep_stale` what a killed session left.
    """

    _made = 0
    _subnets: set = set()  # chosen by clusters of this process (perhaps not up yet)

    def __init__(self, base_dir: Optional[str] = None, cpus: Optional[int] = None) -> None:
        super().__init__(base_dir, cpus)
        TwoNodeCluster._made += 1  # a letter per cluster of this process: two may be up at once
        self.tag = f"cmt{os.getpid()}{'abcdefghijklmnopqrstuvwxyz'[(TwoNodeCluster._made - 1) % 26]}"
        self.bridge = f"{self.tag}br"
        subnet = self._free_subnet()
        self.ctld_addr = f"{subnet}.1"
        self.node_names = [f"{self.tag}n{i}" for i in (1, 2)]
        self.nodes = [(name, f"{subnet}.{10 + i}") for i, name in enumerate(self.node_names, 1)]
        self.netns = {name: f"{self.tag}-n{i}" for i, name in enumerate(self.node_names, 1)}
        self._veths: list[str] = []
        self._made_netns: list[str] = []
        self._hosts_written = False

    @staticmethod
    def _free_subnet() -> str:
        used = _ip("-o", "-4", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
        for third in range(os.getpid() % 200 + 20, 256):
            prefix = f"10.213.{third}"
            if prefix not in TwoNodeCluster._subnets and not re.search(rf"(^|\s){re.escape(prefix)}\.", used, re.M):
                TwoNodeCluster._subnets.add(prefix)
                return prefix
        raise RuntimeError("no free 10.213.x.0/24 subnet for the test bridge")

    def addr_of(self, node: str) -> str:
        return dict(self.nodes)[node]

    def _node_prefix(self, name: str) -> list[str]:
        return [_which("nsenter"), f"--net=/run/netns/{self.netns[name]}"]

    def in_node(self, node: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Runs a command in ``node``'s network namespace."""
        return subprocess.run([*self._node_prefix(node), *argv], **kw)

    def node_pids(self, node: str) -> list[int]:
        """PIDs of the processes running in ``node``'s network namespace (its slurmd and jobs)."""
        return [int(p) for p in _ip("netns", "pids", self.netns[node], check=False).stdout.split()]

    def _setup_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._veths.append(self.bridge)
        _ip("addr", "add", f"{self.ctld_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (name, addr) in enumerate(self.nodes, 1):
            ns, veth = self.netns[name], f"{self.tag}v{i}"
            _ip("netns", "add", ns)
            self._made_netns.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            self._veths.append(veth)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", f"{veth}p", "netns", ns)
            _ip("link", "set", f"{veth}p", "name", "eth1", netns=ns)  # the same name on every node
            _ip("addr", "add", f"{addr}/24", "dev", "eth1", netns=ns)
            _ip("link", "set", "eth1", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
        marker = f"# {self.tag} card_megatron two-node test"
        _edit_hosts(add="".join(f"{addr} {name} {marker}\n" for name, addr in self.nodes))
        self._hosts_written = True

    def _teardown_network(self) -> None:
        for ns in reversed(self._made_netns):  # anything a job left running in a node, by PID
            _kill_pids([int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()])
        for ns in reversed(self._made_netns):
            _ip("netns", "del", ns, check=False)
        self._made_netns.clear()
        for link in reversed(self._veths):
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        self._veths.clear()
        if self._hosts_written:
            _edit_hosts(drop_tag=self.tag)
            self._hosts_written = False

    def start(self, timeout: float = 60.0) -> "TwoNodeCluster":
        sweep_stale()
        try:
            self._setup_network()
        except Exception:
            self._teardown_network()
            raise
        try:
            super().start(timeout)
        except Exception:
            self._teardown_network()
            raise
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._teardown_network()

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (empty after :meth:`stop`)."""
        left = [f"process {n}" for n, p in self._procs.items() if p.poll() is None]
        left += [f"directory {self.sockets}"] if os.path.exists(self.sockets) else []
        netns = _ip("netns", "list", check=False).stdout
        left += [f"netns {ns}" for ns in self.netns.values() if re.search(rf"^{re.escape(ns)}\b", netns, re.M)]
        links = _ip("-o", "link", "show", check=False).stdout
        left += [f"link {m}" for m in re.findall(rf"\d+: ({self.tag}[^:@]*)", links)]
        with open(_HOSTS_FILE) as f:
            left += [f"/etc/hosts: {line.strip()}" for line in f if f"# {self.tag} " in line]
        return left


if __name__ == "__main__":
    import sys

    two = "--two-nodes" in sys.argv[1:]
    if two and netns_unavailable():
        sys.exit(f"cannot start two nodes: {netns_unavailable()}")
    cluster = (TwoNodeCluster(cpus=max(2, os.cpu_count() or 1)) if two else SlurmCluster()).start()
    if two:
        print("nodes: " + ", ".join(f"{n} ({a}, netns {cluster.netns[n]})" for n, a in cluster.nodes), flush=True)
    print(f"export SLURM_CONF={cluster.conf_path}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
