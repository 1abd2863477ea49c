"""What to say when a process group cannot connect: which node, which address, what to check.

A multi-node job whose ranks cannot reach each other fails inside gloo or NCCL with a
message that names neither the node nor the setting at fault (e.g. gloo's "timed out
connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:20914" when a host name
resolves to loopback). :func:`explain_connect_failure` wraps the start of the process
group and re-raises such a failure as :class:`ConnectError`, naming this node, its rank,
the rendezvous address, the address that was tried and the interface settings. The time
it may take is bounded by the process group's timeout (``parallel.distributed_timeout_minutes``).
"""

from __future__ import annotations

import os
import re
import socket
from contextlib import contextmanager
from typing import Iterator


class ConnectError(RuntimeError):
    """A process group could not connect its ranks (the message says where and what to check)."""


def _node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _host_addr() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        return f"unresolvable ({e})"


def describe_connect_failure(error: BaseException, backend: str, timeout_minutes: float) -> str:
    """The message for ``error`` raised while rank ``$RANK`` joined its ``backend`` process group."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    rank = os.environ.get("RANK", "?")
    rendezvous = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    tried = re.search(r"remote=\[([^\]]+)\]:(\d+)", text) or re.search(r"remote=([^\s:\]]+):(\d+)", text)
    iface_vars = ("GLOO_SOCKET_IFNAME",) if backend == "gloo" else ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
    ifaces = ", ".join(f"{v}={os.environ[v]}" if os.environ.get(v) else f"{v} not set" for v in iface_vars)
    parts = [
        f"rank {rank} on node {_node_name()} could not connect its {backend} process group",
        f"rendezvous {rendezvous}",
        f"address tried {tried.group(1)}:{tried.group(2)}" if tried else None,
        f"{ifaces} (host name {socket.gethostname()} resolves to {_host_addr()})",
        f"timeout {timeout_minutes:g} min (parallel.distributed_timeout_minutes)",
    ]
    hint = (
        "every node must reach the rendezvous address, and each rank must advertise an address the "
        "others can reach: set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the interface of the "
        "cluster network (slurm/pretrain.sh picks it per node; see docs/slurm.md)"
    )
    return "; ".join(p for p in parts if p) + f": {first}. Check: {hint}"


@contextmanager
def explain_connect_failure(backend: str, timeout_minutes: float) -> Iterator[None]:
    """Re-raises any failure of the enclosed process-group start as :class:`ConnectError`."""
    try:
        yield
    except ConnectError:
        raise
    except Exception as e:  # gloo/NCCL RuntimeError, DistNetworkError, DistStoreError, TimeoutError
        raise ConnectError(describe_connect_failure(e, backend, timeout_minutes)) from e
