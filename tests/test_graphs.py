"""Static shapes and CUDA graphs on the CPU (``inference/graphs.py``, ``ModelCache`` with ``StaticShapes``).

The static plan against the loop reference of the attention rule; no host sync in a static pass (it runs
on meta tensors, where ``.item()`` is an error, as the dynamic pass shows); static logits against dynamic
ones; the graph runner's static buffers across shapes; its capture/replay plumbing with a stand-in graph
that checks what a real graph relies on (every tensor a pass reads keeps its address); decoding with that
stand-in equals dynamic decoding; the ``--cuda-graphs`` flags. Static == dynamic token for token on the
trained model is in ``tests/test_verify.py``; the real capture on CUDA in ``tests/test_gpu.py``.

Tolerance of the logits (fp32, one pass): the static pass attends over the whole capacity, the hidden keys
get exactly zero weight, so only the lengths of the reductions differ from the dynamic pass (the order of
the rounding). Measured gap: at most 1.8e-7 on logits up to 0.9 (``test_static_logits_equal_dynamic``'s
procedure with model seeds 5-14, its three configurations; x86 CPU); rtol = atol = 1e-5 (as
``tests/test_kv_cache.py``) is 50x that and far below what a wrong mask or position does (1e-2 and more).
"""

import dataclasses
import importlib
import importlib.util
import os

import pytest
import torch

from card_megatron.config import ModelConfig
from card_megatron.inference import graphs, sampling
from card_megatron.inference.cache import KVCache, ModelCache, StaticShapes
from card_megatron.inference.causal import CausalDecodeConfig, SpecialTokenIds, decode_causal
from tests.test_kv_cache import _reference_mask

V = 96
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = SpecialTokenIds(eos=3, mask=4, pad=0)
PROMPTS = [[3, 17, 40, 8, 9, 55], [3], [3, 60, 61], [3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _model(groups=None, seed=5, sharpen=1.0, untied=True):
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=groups,
        ffn_hidden_size=64,
        seq_length=64,
        untie_embeddings_and_output_weights=untied,
    )
    model = CardGPT(cfg, "causal", vocab_size=V, seed=seed).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            model.output.output_layer.weight.mul_(sharpen)
    return model


@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("with_valid", [False, True])
def test_static_plan_matches_loop_reference(block, with_valid):
    """Keys over the whole capacity; visible: the rule, and only written slots (k < lengths + S). Under the
    causal rule or with ``valid`` that is the dynamic mask, and nothing past the dynamic key length."""
    capacity, s = 24, 5
    static = KVCache.empty(3, capacity, 2, 4, torch.float32, "cpu", block=block, static=True)
    dynamic = KVCache.empty(3, capacity, 2, 4, torch.float32, "cpu", block=block)
    for cache in (static, dynamic):
        cache.lengths = torch.tensor([0, 6, 3])
        cache.valid = torch.tensor([2, 5, 1]) if with_valid else None
    pos, mask = static.plan(s)
    assert mask.shape == (3, 1, s, capacity)
    written = torch.arange(capacity)[None, None, :] < (static.lengths + s)[:, None, None]
    assert torch.equal(mask[:, 0], _reference_mask(static.lengths, s, capacity, block, static.valid) & written)
    dyn_pos, dyn_mask = dynamic.plan(s)
    assert torch.equal(pos, dyn_pos) and not bool(static.overflow)
    if block == 1 or with_valid:
        total = dyn_mask.shape[-1]
        assert torch.equal(mask[..., :total], dyn_mask) and not mask[..., total:].any()


def test_static_overflow_is_flagged_and_raised_on_exit(single_process):
    """A position past the capacity is written to the last slot (no out-of-bounds index on a device) and
    raises a device flag; the context manager turns it into the dynamic path's error."""
    cache = KVCache.empty(1, 4, 1, 2, torch.float32, "cpu", static=True)
    cache.lengths = torch.tensor([3])
    cache.plan(2)
    assert bool(cache.overflow)
    with pytest.raises(ValueError, match="overflow"):
        with torch.no_grad(), ModelCache(_model(), 1, 4, lean=True, static=StaticShapes(new=1)) as mc:
            mc.forward(torch.ones(1, 5, dtype=torch.long))


def test_static_pass_makes_no_host_sync(single_process):
    """A static pass runs on meta tensors (no data: ``.item()``, ``int(t)``, ``bool(t)`` raise); the dynamic
    pass does not (it reads max(lengths) on the host). So nothing in it waits for the device."""
    model = _model(groups=2).to("meta")
    ids = torch.zeros(3, 3, dtype=torch.long, device="meta")
    gather = torch.zeros(3, 2, dtype=torch.long, device="meta")
    for static in (StaticShapes(new=4, gather=2), None):
        cache = ModelCache(model, 3, 16, lean=True, static=static)
        try:
            with torch.inference_mode():
                if static is None:
                    with pytest.raises(RuntimeError, match="meta"):
                        cache.forward(ids, gather=gather)
                else:
                    assert cache.forward(ids, gather=gather).shape == (3, 2, V)
                    cache.advance(torch.ones(3, dtype=torch.long, device="meta"))
        finally:
            cache.detach()


@pytest.mark.parametrize("groups,lean,untied", [(None, True, True), (2, True, False), (2, False, True)])
def test_static_logits_equal_dynamic(single_process, groups, lean, untied):
    """Ragged sequences fed in uneven chunks, right padded, then two rows dropped and reordered: the
    static pass (whole capacity, padded to 8 new positions, finished rows kept) gives the dynamic
    pass's logits on every real position, through the lean path and Megatron's modules; after
    ``select`` the runner still sees one shape."""
    model = _model(groups=groups, untied=untied)
    gen = torch.Generator().manual_seed(0)
    chunks = torch.tensor([[3, 2, 1, 2], [4, 4, 3, 1], [1, 1, 2, 1], [1, 6, 1, 2]])  # [sequence, pass]
    ids = [torch.randint(5, V, (4, 7), generator=gen) for _ in range(chunks.shape[1])]
    selects = {2: torch.tensor([3, 0, 2])}  # after pass 2: drop sequence 1, reorder
    got = {}
    for name, static in (("dynamic", None), ("static", StaticShapes(new=8, gather=3))):
        out, rows = [], torch.arange(4)
        with torch.inference_mode(), ModelCache(model, 4, 40, lean=lean, static=static) as cache:
            for step, x in enumerate(ids):
                sizes = chunks[rows, step]
                x = x[rows, : int(sizes.max())]
                out.append((cache.forward(x), sizes))
                out.append((cache.forward(x, gather=(sizes - 1)[:, None]), torch.ones_like(sizes)))
                out.append((cache.forward(x, valid=sizes), sizes))
                cache.advance(sizes)
                if step in selects:
                    cache.select(selects[step])
                    rows = rows[selects[step]]
            got[name] = out
            if static is not None:
                assert len(cache.runner.entries) == 3  # S 8 with gather none / 3 rows / valid
    for (a, sizes), (b, _) in zip(got["dynamic"], got["static"]):
        assert a.shape == b.shape
        for r, n in enumerate(sizes.tolist()):  # real positions (the padding differs: to the longest chunk / to 8)
            torch.testing.assert_close(b[r, :n], a[r, :n], **TOL)
    assert all(att.kv_cache is None for att in model.core_attentions())


def test_static_refuses_block_rules(single_process):
    with pytest.raises(ValueError, match="causal rule"):
        ModelCache(_model(), 2, 8, block=4, static=StaticShapes())
    with ModelCache(_model(), 2, 8, static=StaticShapes()) as cache, pytest.raises(ValueError, match="block 1"):
        cache.set_block(4)


def _fn(x, idx=None):
    """A pure stand-in pass: [B, S] float and optional [B, G] indices -> [B, G or S]."""
    y = (x * 3 + 1).cumsum(1)
    return y if idx is None else y.gather(1, idx)


def test_runner_buffers_across_shapes_equal_fresh_calls():
    """Shapes interleaved (and an absent input): every call equals the function on its own inputs; one
    entry per shape; the output is the shape's buffer, overwritten by that shape's next call only."""
    runner = graphs.CudaGraphForward(_fn, "cpu")
    gen = torch.Generator().manual_seed(1)
    calls = []
    for shape, g in [((2, 5), 3), ((4, 1), None), ((2, 5), 3), ((2, 5), None), ((4, 1), None), ((2, 5), 3)]:
        x = torch.randn(shape, generator=gen)
        idx = None if g is None else torch.randint(0, shape[1], (shape[0], g), generator=gen)
        out = runner(x=x, idx=idx)
        torch.testing.assert_close(out, _fn(x, idx), rtol=0, atol=0)
        calls.append((out, x, idx))
    assert len(runner.entries) == 3 and runner.counts == {"eager": 6, "captured": 0, "replayed": 0}
    assert calls[0][0] is calls[2][0] is calls[5][0] and calls[1][0] is calls[4][0]  # reused buffers
    assert calls[3][0] is not calls[0][0]
    with pytest.raises(ValueError, match="capture_after"):
        graphs.CudaGraphForward(_fn, "cpu", capture_after=0)


class _StandInGraph:
    """What the runner needs of a ``torch.cuda.CUDAGraph``: ``replay()``. It reruns the captured function
    on the static buffers and copies into the output recorded at capture, after checking that every
    tensor the pass reads (``watched()``) still has the address it had at capture (a real graph reads
    by address: a tensor rebound or reallocated since would be silently stale)."""

    def __init__(self, fn, inputs, output, watched):
        self.fn, self.inputs, self.output, self.watched = fn, inputs, output, watched
        self.pointers = [t.data_ptr() for t in watched()]

    def replay(self):
        assert [t.data_ptr() for t in self.watched()] == self.pointers, "a captured tensor moved"
        self.output.copy_(self.fn(**self.inputs))


class _StandInRunner(graphs.CudaGraphForward):
    """``CudaGraphForward`` with graphs on, on the CPU, capturing :class:`_StandInGraph`."""

    instances: list = []

    def __init__(self, fn, device, use_graphs=True, **kw):
        super().__init__(fn, device, use_graphs, **kw)
        self.use_graphs = use_graphs
        _StandInRunner.instances.append(self)

    def _capture(self, entry):
        cache = getattr(self.fn, "__self__", None)

        def watched():
            inputs = [t for t in entry.inputs.values() if t is not None]
            if cache is None:
                return inputs
            kv = [t for c in cache.layers for t in (c.keys, c.values, c.lengths, c.overflow)]
            return inputs + kv

        output = self.fn(**entry.inputs).clone()
        entry.graph, entry.output = _StandInGraph(self.fn, entry.inputs, output, watched), output
        self.counts["captured"] += 1


def test_runner_capture_and_replay_plumbing():
    """With a stand-in graph: a shape runs eagerly ``capture_after`` times, is captured once, then replayed;
    results equal fresh calls whatever the order of shapes."""
    runner = _StandInRunner(_fn, "cpu", capture_after=2)
    gen = torch.Generator().manual_seed(2)
    for shape in [(2, 5), (3, 4), (2, 5), (2, 5), (3, 4), (2, 5), (3, 4), (3, 4)]:
        x = torch.randn(shape, generator=gen)
        torch.testing.assert_close(runner(x=x), _fn(x), rtol=0, atol=0)
    assert runner.counts == {"eager": 4, "captured": 2, "replayed": 4}


@pytest.mark.parametrize(
    "cfg",
    [
        CausalDecodeConfig(window=1),
        CausalDecodeConfig(window=4, threshold=0.6),
        CausalDecodeConfig(window=3, threshold=0.6, commit_policy="any", max_steps=4),
        CausalDecodeConfig(window=5, commit_policy="verify"),
    ],
    ids=["ar", "card", "card-any-max-steps", "verify"],
)
def test_decoding_through_captured_graphs_equals_dynamic(single_process, monkeypatch, cfg):
    """Decoding with the stand-in graphs (captured on a shape's second pass, replayed after; the KV cache
    and lengths never move) commits the same tokens in the same passes as dynamic decoding, greedy and
    sampled, on a ragged batch where sequences finish at different passes."""
    monkeypatch.setattr(graphs, "CudaGraphForward", _StandInRunner)
    model = _model(seed=11, sharpen=30.0)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[SPECIAL.mask, SPECIAL.pad, 2]] = True
    for samp in (sampling.SamplingConfig(greedy=True), sampling.SamplingConfig(temperature=1.0, top_k=20, seed=1)):
        seeds = sampling.sequence_seeds(samp.seed, torch.arange(len(PROMPTS)))
        _StandInRunner.instances.clear()
        with torch.inference_mode():
            ref = decode_causal(model, PROMPTS, 14, SPECIAL, banned, samp, seeds, cfg)[0]
            eos = SpecialTokenIds(eos=ref[0].token_ids[5], mask=SPECIAL.mask, pad=SPECIAL.pad)  # sequence 0 stops
            for special in (SPECIAL, eos):
                ref = decode_causal(model, PROMPTS, 14, special, banned, samp, seeds, cfg)[0]
                got = decode_causal(
                    model, PROMPTS, 14, special, banned, samp, seeds, dataclasses.replace(cfg, cuda_graphs=True)
                )[0]
                assert [(o.token_ids, o.num_forward_passes, o.stopped) for o in got] == [
                    (o.token_ids, o.num_forward_passes, o.stopped) for o in ref
                ]
        assert ref[0].stopped == "eos" and len({o.num_forward_passes for o in ref}) > 1
        counts = [r.counts for r in _StandInRunner.instances]
        assert all(c["captured"] >= 1 and c["replayed"] >= 1 for c in counts), counts


def test_cuda_graphs_needs_the_lean_path():
    with pytest.raises(ValueError, match="--no-lean"):
        CausalDecodeConfig(cuda_graphs=True, lean=False)


@pytest.mark.parametrize("tool", ["card_megatron.tools.generate", "tools/benchmark_generate.py"])
def test_cuda_graphs_flag_in_help(tool):
    if tool.endswith(".py"):  # a script of tools/
        spec = importlib.util.spec_from_file_location("tool_benchmark", os.path.join(REPO, tool))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(tool)
    parser = module.build_parser()
    text = " ".join(parser.format_help().split())
    assert "--cuda-graphs" in text and "CPU" in text
    assert parser.parse_args(["--checkpoint", "x", "--cuda-graphs"]).cuda_graphs
