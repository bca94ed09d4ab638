"""CUDA graphs of the backbone (InternViT6B(cuda_graphs=N)): which calls replay, what is kept.

On CPU the capture itself is replaced by a stand-in that records the function and reruns it
on replay, so the cache, the keys, the fallbacks and the copies are what is tested here; on a
GPU the last test records real graphs and checks replay against eager bit for bit.
"""
import pytest
import torch

from helpers import small_model
from internvit_fast import graphs


@pytest.fixture
def fake_graphs(monkeypatch):
    """Capture that reruns the function on replay; CPU inputs count as graphable."""
    recorded = []

    def capture(fn, device, pool=None):
        out = fn()
        recorded.append(device)

        def replay():
            for o, n in zip(out, fn()):
                o.copy_(n)
        return replay, out

    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "graphable_device", lambda x: True)
    return recorded


def _pair(**kw):
    graphed = small_model(dtype=torch.float32, out_indices=[1, 3], cuda_graphs=2, **kw).eval()
    eager = small_model(dtype=torch.float32, out_indices=[1, 3], **kw).eval()
    eager.load_state_dict(graphed.state_dict())
    return graphed, eager


def test_replays_per_shape_with_new_inputs_and_returns_copies(fake_graphs):
    graphed, eager = _pair()
    with torch.no_grad():
        for _ in range(3):  # the same shape: one capture, new values each call
            img = torch.randn(2, 3, 56, 56)
            got, want = graphed(img), eager(img)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        assert graphed._graphs.captures == 1 and len(fake_graphs) == 1
        held = [o.clone() for o in got]
        graphed(torch.randn(2, 3, 56, 56))
        assert all(torch.equal(a, b) for a, b in zip(got, held)), "a replay overwrote returned outputs"


def test_at_most_n_graphs_least_recently_used_first(fake_graphs):
    graphed, _ = _pair()
    with torch.no_grad():
        for size in (56, 42, 56, 70, 42):
            graphed(torch.randn(1, 3, size, size))
    # 56 and 42 captured, 56 reused, 70 evicts 42, 42 again evicts 56: 4 captures, 2 kept
    assert graphed._graphs.captures == 4 and len(graphed._graphs) == 2


def test_gradients_and_stochastic_depth_run_eager(fake_graphs):
    graphed, eager = _pair(drop_path_rate=0.2)
    img = torch.randn(1, 3, 56, 56)
    graphed.train()
    with torch.no_grad():
        graphed(img)  # training with drop path: eager
    graphed.eval()
    out = graphed(img)  # grad enabled and the weights require grad: eager, differentiable
    out[0].sum().backward()
    assert graphed.blocks[0].attn.qkv.weight.grad is not None
    assert graphed._graphs.captures == 0
    with torch.no_grad():
        graphed(img)
    assert graphed._graphs.captures == 1


def test_moved_weights_get_a_new_graph(fake_graphs):
    graphed, eager = _pair()
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        graphed(img)
        graphed.double().float()  # re-allocated parameters: the old graph reads freed memory
        graphed(img)
        eager_out = eager(img)
    assert graphed._graphs.captures == 2
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(graphed(img), eager_out))


def test_autocast_and_math_modes_get_their_own_graph(fake_graphs):
    """A graph recorded without autocast must not be replayed under it (another computation)."""
    graphed, eager = _pair()
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        plain = graphed(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = graphed(img)
            want = eager(img)
        assert graphed._graphs.captures == 2
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert any(not torch.equal(a, b) for a, b in zip(got, plain))  # it is another computation
        with torch.autocast("cpu", dtype=torch.float16):
            graphed(img)
        assert graphed._graphs.captures == 3
        graphed.out_indices = [3]
        assert len(graphed(img)) == 1 and graphed._graphs.captures == 4
        sig = graphs.GraphCache.signature
        before = sig(graphed, img)
        torch.use_deterministic_algorithms(True)
        try:
            assert sig(graphed, img) != before
        finally:
            torch.use_deterministic_algorithms(False)
        graphed.fp8_attention = True  # another attention (FP8 under precision="fp8")
        assert sig(graphed, img) != before


def test_cpu_inputs_run_eager_without_the_stand_in():
    graphed, eager = _pair()
    with torch.no_grad():
        img = torch.randn(1, 3, 56, 56)
        assert all(torch.equal(a, b) for a, b in zip(graphed(img), eager(img)))
    assert graphed._graphs.captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs: needs a GPU")
@pytest.mark.parametrize("fast", [False, True])
def test_real_graph_replay_equals_eager_exactly(fast):
    graphed, eager = (m.cuda() for m in _pair(fast=fast))
    with torch.inference_mode():
        for _ in range(2):
            img = torch.randn(2, 3, 56, 70, device="cuda")
            for g, w in zip(graphed(img), eager(img)):
                assert torch.equal(g, w)
    assert graphed._graphs.captures == 1
