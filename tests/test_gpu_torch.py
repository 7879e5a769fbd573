"""fastopt.torch on CUDA tensors: parity with torch.optim, kernels ordered on torch's current
stream, CPU offload of a GPU model. Skipped without a CUDA GPU (and without a fastopt GPU backend)."""

import copy

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import fastopt.torch as fot  # noqa: E402


def mlp(device="cuda"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(
        device
    )


def train_in_lockstep(pairs, steps, batch, after_step=None):
    """Train every (model, optimizer) of ``pairs`` on the same random batches (loss: the mean
    square of the output), calling ``after_step(t)`` after each step; then synchronize."""
    for t in range(steps):
        x = torch.randn(batch, 32, device="cuda")
        for m, o in pairs:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        if after_step is not None:
            after_step(t)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["adamw", "sgd", "nadam", "rmsprop"])
def test_cuda_matches_torch_with_state_swap(name):
    cls = fot.OPTIMIZER_CLASSES[name]
    mf, mt = mlp(), mlp()
    of = cls(mf.parameters(), lr=1e-2)
    ot = getattr(torch.optim, cls.__name__)(mt.parameters(), lr=1e-2)
    assert all(p.is_cuda for p in mf.parameters())

    def swap_states(t):
        if t == 20:
            a, b = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
            of.load_state_dict(b)
            ot.load_state_dict(a)

    train_in_lockstep(((mf, of), (mt, ot)), steps=50, batch=16, after_step=swap_states)
    for a, b in zip(mf.parameters(), mt.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_step_on_a_side_stream_is_ordered():
    m = mlp()
    opt = fot.SGD(m.parameters(), lr=0.5)
    ref = [p.detach().clone() for p in m.parameters()]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        torch.cuda._sleep(10_000_000)  # keep the stream busy: an unordered launch would race
        opt.step()
        after = [p.detach().clone() for p in m.parameters()]
    side.synchronize()
    for a, r in zip(after, ref):
        assert torch.allclose(a, r - 0.5)


def test_cpu_offload_of_a_gpu_model_equals_the_gpu_optimizer():
    ma, mb = mlp(), mlp()
    on_gpu = fot.AdamW(ma.parameters(), lr=1e-2)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=1e-2)
    assert all(m.device.type == "cpu" for m in off.masters)
    assert off.inner._buckets[0][1].flat.is_pinned()
    train_in_lockstep(((ma, on_gpu), (mb, off)), steps=10, batch=8)
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_model_to_cpu_is_detected():
    m = mlp()
    opt = fot.Adam(m.parameters())
    m.cpu()
    m(torch.ones(1, 32)).sum().backward()
    with pytest.raises(RuntimeError, match="state_dict"):
        opt.step()
