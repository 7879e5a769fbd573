"""fastopt.torch on CUDA tensors: parity with torch.optim, kernels ordered on torch's current
stream, CPU offload of a GPU model. Skipped without a CUDA GPU (and without a fastopt GPU backend)."""

import copy

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")
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


INT8_SHAPES = [(70, 64), (70,), (73, 64), (73,)]
"""Two weights of 8-bit state (neither fills its last block) and two biases of float32 state."""

INT8_CASES = [
    ("numba-cuda", torch.float32, {}),
    ("numba-cuda", torch.bfloat16, {"master_weights": True}),
    ("cupy", torch.float32, {}),
    ("cupy", torch.bfloat16, {"master_weights": True}),
]


def _state_arrays(opt):
    """{(param index, name): host copy} of every array of ``opt.state_dict()``."""
    out = {}
    for i, entry in opt.state_dict()["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                out[i, name] = v.detach().cpu().clone()
    return out


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.uint8)


def _int8_step(opts_and_params, grads, skip=()):
    for opt, ps in opts_and_params:
        for k, (p, g) in enumerate(zip(ps, grads)):
            p.grad = None if k in skip else g.to(p.device).clone()
        opt.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize(
    "backend,dtype,options", INT8_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d, _ in INT8_CASES]
)
def test_int8_state_on_cuda_follows_the_cpu(backend, dtype, options):
    """state_dtype="int8" on CUDA tensors: the same per-parameter blocks as on the CPU; the
    parameters and 8-bit state follow the CPU optimizer (CuPy bit for bit: its kernels round
    every operation as the CPU does; numba-cuda within NVVM's fused multiply-adds, a code moving
    by at most one); a parameter without a gradient keeps its value and its codes; a GPU
    state_dict reloads on the GPU and training continues bit for bit; the CPU's loads there."""
    if backend == "cupy":
        pytest.importorskip("cupy")
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in INT8_SHAPES]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype="int8", **options)
    oc, og = fot.AdamW(cpu, **kw), fot.AdamW(gpu, backend=backend, **kw)
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in INT8_SHAPES] for _ in range(6)]
    pairs = ((oc, cpu), (og, gpu))
    _int8_step(pairs, grads[0])
    _int8_step(pairs, grads[1])
    kept_param, kept_state = _bits(gpu[0]), _state_arrays(og)
    _int8_step(pairs, grads[2], skip=(0,))  # the first weight has no gradient this step
    assert torch.equal(_bits(gpu[0]), kept_param)
    after = _state_arrays(og)
    assert all(torch.equal(_bits(after[k]), _bits(v)) for k, v in kept_state.items() if k[0] == 0)
    _int8_step(pairs, grads[3])

    got, want = _state_arrays(og), _state_arrays(oc)
    assert sorted(got) == sorted(want)
    assert any(v.dtype == torch.uint8 for v in want.values())  # 8-bit slots exist
    exact = backend == "cupy"
    tol = 2.0**-7 if dtype != torch.float32 else 1e-5  # one bfloat16 ulp
    for a, b in zip(gpu, cpu):
        if exact:
            assert torch.equal(_bits(a), _bits(b))
        else:
            assert torch.allclose(a.detach().cpu().float(), b.detach().float(), rtol=tol, atol=1e-6)
    for key, w in want.items():
        g = got[key]
        if exact:
            assert torch.equal(_bits(g), _bits(w)), key
        elif w.dtype == torch.uint8:
            diff = (g.long() - w.long()).abs()
            assert diff.max() <= 1 and diff.count_nonzero() <= w.numel() // 100, key
        else:
            assert torch.allclose(g.float(), w.float(), rtol=tol, atol=1e-7), key

    # a GPU state_dict reloads on the GPU: training continues bit for bit
    twin = [torch.nn.Parameter(p.detach().clone()) for p in gpu]
    ot = fot.AdamW(twin, backend=backend, **kw)
    ot.load_state_dict(og.state_dict())
    for g in grads[4:]:
        _int8_step(((og, gpu), (ot, twin)), g)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(gpu, twin))
    twin_state = _state_arrays(ot)
    assert all(torch.equal(_bits(v), _bits(twin_state[k])) for k, v in _state_arrays(og).items())

    # the CPU's state_dict loads on the GPU as it is
    on_gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    from_cpu = fot.AdamW(on_gpu, backend=backend, **kw)
    from_cpu.load_state_dict(oc.state_dict())
    loaded, cpu_state = _state_arrays(from_cpu), _state_arrays(oc)
    assert sorted(loaded) == sorted(cpu_state)
    assert all(torch.equal(_bits(v), _bits(cpu_state[k])) for k, v in loaded.items())
