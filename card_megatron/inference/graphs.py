"""CUDA graphs for the static-shape decode path: one captured graph per input shape, replayed.

A decode step of a small model on a GPU is bound by kernel launches, not arithmetic: the lean
forward (``inference/lean.py``) issues a few dozen kernels per layer. A ``torch.cuda.CUDAGraph``
records them once and replays them with one launch. Replay reruns the recorded kernels on the
recorded memory, so everything a pass reads must sit at fixed addresses with fixed shapes: the
inputs are copied into static buffers, the KV cache is written in place, and the forward
computes its attention plan from tensors only (``KVCache`` in static mode: keys over the whole
capacity, no host sync). :class:`CudaGraphForward` keeps those buffers per shape.

On CUDA, a shape runs eagerly on its first ``capture_after`` calls (a prefill's shape is
usually seen once and never pays for a capture), then is warmed up on a side stream and
captured (the procedure of PyTorch's CUDA-graphs notes), and every later call replays it. On
a CPU, or with ``use_graphs=False``, every call runs the same function eagerly through the
same static buffers, and the result is copied into the same static output buffer, so all but
capture and replay is exercised by the CPU tests. Each graph has its own memory pool (no
sharing: the decoders replay graphs of different shapes in any order).

The returned tensor is the shape's static output buffer: the next call of that shape
overwrites it, so a caller copies what it keeps (``ModelCache.forward`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Key = tuple


@dataclass
class _Entry:
    """Static buffers of one input shape, its output buffer and (once captured) its graph."""

    inputs: dict[str, Optional[torch.Tensor]]
    output: Optional[torch.Tensor] = None
    graph: Optional[object] = None  # torch.cuda.CUDAGraph, or a test's stand-in with .replay()
    uses: int = 0


class CudaGraphForward:
    """``__call__(**inputs) -> fn(**static copies of inputs)`` with one CUDA graph per input shape.

    fn: a function of keyword tensors (None allowed) returning one tensor, that reads its inputs
    only from its arguments and from tensors that never move (weights, an in-place KV cache) and
    makes no host sync (no ``.item()``, no branching on tensor values); use_graphs: capture on
    CUDA (ignored elsewhere); capture_after: eager calls of a shape before it is captured (>= 1);
    num_warmup: side-stream runs before a capture. A run must be repeatable with the same
    effect (the warm-up runs it again on the same buffers): the KV cache writes are.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        device: torch.device,
        use_graphs: bool = True,
        capture_after: int = 1,
        num_warmup: int = 1,
    ):
        if capture_after < 1:
            raise ValueError(
                f"capture_after ({capture_after}) must be >= 1: a shape runs eagerly before it is captured"
            )
        self.fn = fn
        self.device = torch.device(device)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.capture_after = capture_after
        self.num_warmup = num_warmup
        self.entries: dict[Key, _Entry] = {}
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}  # calls run eagerly, graphs captured, replays

    @staticmethod
    def key(inputs: dict[str, Optional[torch.Tensor]]) -> Key:
        """(name, shape, dtype) of every input, None for an absent one: what a graph is specialised to."""
        return tuple((name, None if t is None else (tuple(t.shape), t.dtype)) for name, t in sorted(inputs.items()))

    def __call__(self, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        key = self.key(inputs)
        entry = self.entries.get(key)
        if entry is None:
            entry = _Entry({n: None if t is None else torch.empty_like(t) for n, t in inputs.items()})
            self.entries[key] = entry
        for name, t in inputs.items():
            if t is not None:
                entry.inputs[name].copy_(t)
        entry.uses += 1
        if entry.graph is None and self.use_graphs and entry.uses > self.capture_after:
            self._capture(entry)
        if entry.graph is not None:
            entry.graph.replay()
            self.counts["replayed"] += 1
            return entry.output
        out = self.fn(**entry.inputs)
        if entry.output is None or entry.output.shape != out.shape:
            entry.output = torch.empty_like(out)
        entry.output.copy_(out)
        self.counts["eager"] += 1
        return entry.output

    def _capture(self, entry: _Entry) -> None:
        """Warm-up on a side stream, then capture ``fn`` on the entry's buffers into a new graph
        (its output tensor becomes the entry's output buffer)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.num_warmup):
                self.fn(**entry.inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(**entry.inputs)
        entry.graph, entry.output = graph, output
        self.counts["captured"] += 1
