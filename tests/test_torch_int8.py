"""8-bit optimizer state through fastopt.torch (``state_dtype="int8"``): every parameter of at
least MIN_8BIT_SIZE elements keeps its state in 8-bit blocks of its own (its start in the flat
buffer is a multiple of 256), the smaller ones float32 state, so the adapter equals the fastopt
core over the parameters as separate arrays bit for bit, and a parameter without a gradient
keeps its value and its state bits, as in torch; state_dicts round-trip with fastopt's keys and
a float state from torch.optim is quantized on load; CPU offload keeps ~2.03 bytes of Adam
state per 8-bit parameter.
"""

import copy

import numpy as np
import pytest
from oracle import torch_or_skip

import fastopt as fo
from fastopt.optim import precision

torch = torch_or_skip()
import fastopt.torch as fot  # noqa: E402

pytestmark = pytest.mark.usefixtures("serial_kernels")

SHAPES = [(70, 64), (70,), (73, 64), (73,)]
"""Two weights of 8-bit state (4480 and 4672 elements: neither fills its last block) and two
biases of float32 state."""

CASES = [
    (fot.AdamW, fo.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (fot.SGD, fo.SGD, {"lr": 0.1, "momentum": 0.9}),
]


def params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def run(opt, ps, gs, missing=()):
    """Steps with gradients ``gs``; at step t the params of index ``missing[t]`` get none."""
    for t, step in enumerate(gs):
        gone = missing[t] if t < len(missing) else ()
        for k, (p, g) in enumerate(zip(ps, step)):
            p.grad = None if k in gone else g.clone()
        opt.step()


def run_core(core, arrays, gs, missing=()):
    for t, step in enumerate(gs):
        gone = missing[t] if t < len(missing) else ()
        core.step([None if k in gone else g.numpy() for k, g in enumerate(step)])


def flat(ps):
    return torch.cat([p.detach().reshape(-1) for p in ps]).numpy()


def same_bits(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def as_numpy(v):
    return v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def assert_state_equals_the_core(opt, core):
    """The adapter's state_dict entries equal the core's (over the params as separate arrays)
    bit for bit: the same keys, codes, block absmax, float state and step counts."""
    got, want = opt.state_dict()["state"], core.state_dict()["state"]
    assert sorted(got) == sorted(want)
    for i, entry in want.items():
        assert sorted(got[i]) == sorted(entry), i
        for name, v in entry.items():
            if isinstance(v, np.ndarray):
                assert same_bits(as_numpy(got[i][name]).reshape(v.shape), v), (i, name)
            elif isinstance(v, str):
                assert got[i][name] == v, (i, name)
            else:
                assert float(got[i][name]) == v, (i, name)


def snapshot(opt, p):
    """Bits of ``p`` and of every tensor of its state (codes, absmax, float state, step)."""
    sd = opt.state_dict()["state"]
    index = next(
        i for i, q in enumerate(q for g in opt.param_groups for q in g["params"]) if q is p
    )
    state = {k: v for k, v in sd.get(index, {}).items() if isinstance(v, torch.Tensor)}
    return [p.detach().clone()] + [state[k].clone() for k in sorted(state)]


def same_tensors(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("adapter,core_class,kwargs", CASES, ids=["adamw", "sgd_momentum"])
def test_int8_state_equals_the_core_over_separate_arrays(adapter, core_class, kwargs):
    ps, gs = params(), grads(3)
    arrays = [p.detach().numpy().copy() for p in ps]
    core = core_class(arrays, state_dtype="int8", **kwargs)
    opt = adapter(ps, state_dtype="int8", **kwargs)
    run(opt, ps, gs)
    run_core(core, arrays, gs)
    assert same_bits(flat(ps), np.concatenate([a.reshape(-1) for a in arrays]))
    assert_state_equals_the_core(opt, core)
    # the layout: the weights in an 8-bit buffer, each on a block boundary; the biases apart
    (_, big), (_, small) = opt._buckets
    assert big.offsets == [(0, 4480), (4608, 4608 + 4672)] and opt._quantized == [True, False]
    assert small.names == ["param_groups[0][1]", "param_groups[0][3]"]


def test_gaps_between_parameters_stay_zero_with_a_nonzero_initial_state():
    # Yogi starts both moments at 1e-6; gradients of 5e-4 lower the second moment below it. A
    # gap filled with the initial value would hold the absmax of each weight's last block at
    # 1e-6; the core over separate arrays has no gap.
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params()[::2]]  # the two weights
    arrays = [p.detach().numpy().copy() for p in ps]
    opt = fot.Yogi(ps, lr=1e-2, state_dtype="int8")
    core = fo.Yogi(arrays, lr=1e-2, state_dtype="int8")
    gs = [[g.sign() * 5e-4 for g in step[::2]] for step in grads(2)]
    run(opt, ps, gs)
    run_core(core, arrays, gs)
    assert same_bits(flat(ps), np.concatenate([a.reshape(-1) for a in arrays]))
    assert_state_equals_the_core(opt, core)
    assert float(opt.state_dict()["state"][0]["exp_avg_sq_absmax"][-1]) < 1e-6


def test_small_parameters_keep_float32_state_however_many():
    # 40 biases of 120 elements (4800, more than the weight's 4480): the core takes 8-bit state
    # for units of at least its min_8bit_size, so their run is cut into units below the weight's
    gen = torch.Generator().manual_seed(0)
    shapes = [(70, 64)] + [(120,)] * 40
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    arrays = [p.detach().numpy().copy() for p in ps]
    opt = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    core = fo.AdamW(arrays, lr=1e-2, state_dtype="int8")
    gs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    run(opt, ps, gs)
    run_core(core, arrays, gs)
    assert same_bits(flat(ps), np.concatenate([a.reshape(-1) for a in arrays]))
    assert_state_equals_the_core(opt, core)
    small = ps[1:]  # alone: one float32 unit of 4800 elements
    alone = fot.AdamW(small, lr=1e-2, state_dtype="int8")
    run(alone, small, [step[1:] for step in gs[:1]])
    assert opt._quantized == [True, False] and alone._quantized == [False]
    assert all(v.dtype == torch.float32 for v in alone._tensors[0].values())


def test_a_layer_without_gradient_keeps_its_value_and_state_bits():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(64, 70), [torch.nn.Linear(70, 73), torch.nn.Linear(70, 73)]
    model = torch.nn.ModuleList([trunk, *heads])
    ps = list(model.parameters())
    arrays = [p.detach().numpy().copy() for p in ps]
    options = {"lr": 1e-2, "weight_decay": 0.1, "state_dtype": "int8"}
    opt, core = fot.AdamW(model.parameters(), **options), fo.AdamW(arrays, **options)
    x = torch.randn(8, 64)
    for t in range(5):
        head = heads[t % 2] if t < 3 else heads[0]  # heads[1] steps at t=1 only
        opt.zero_grad(set_to_none=True)
        head(torch.tanh(trunk(x))).square().mean().backward()
        idle = heads[1 - t % 2] if t < 3 else heads[1]
        before = [snapshot(opt, p) for p in idle.parameters()]
        assert all(p.grad is None for p in idle.parameters())
        grads = [None if p.grad is None else p.grad.numpy().copy() for p in ps]
        opt.step()
        core.step(grads)
        for p, b in zip(idle.parameters(), before):
            assert same_tensors(snapshot(opt, p), b), (t, tuple(p.shape))
        assert same_bits(flat(ps), np.concatenate([a.reshape(-1) for a in arrays])), t
    assert_state_equals_the_core(opt, core)
    state = opt.state_dict()["state"]
    steps = [int(state[i]["step"]) for i in sorted(state)]
    assert steps == [5, 5, 4, 4, 1, 1]


def test_state_dict_round_trip_after_a_partial_step():
    ps, gs = params(), grads(5)
    missing = [(), (2, 3), (), (0,)]  # the second layer skips step 1, the first weight step 3
    opt = fot.AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    run(opt, ps, gs[:2], missing)
    sd = copy.deepcopy(opt.state_dict())
    entry = sd["state"][2]  # the second weight: 4672 elements, its own 19 blocks
    assert sorted(entry) == sorted(
        ["step"] + [f"{n}{s}" for n in ("exp_avg", "exp_avg_sq") for s in ("", "_absmax", "_qmap")]
    )
    assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg"].shape == (73, 64)
    assert entry["exp_avg_absmax"].shape == (19,) and entry["exp_avg_qmap"] == "signed"
    assert entry["exp_avg_sq_qmap"] == "unsigned"
    assert int(entry["step"]) == 1 and int(sd["state"][0]["step"]) == 2
    assert sd["state"][1]["exp_avg"].dtype == torch.float32  # a bias: float32 state
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fot.AdamW(ps2, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    opt2.load_state_dict(sd)
    run(opt, ps, gs[2:], missing[2:])
    run(opt2, ps2, gs[2:], missing[2:])
    assert same_bits(flat(ps), flat(ps2))
    got, want = opt2.state_dict()["state"], opt.state_dict()["state"]
    assert all(same_tensors(snapshot(opt2, a), snapshot(opt, b)) for a, b in zip(ps2, ps))
    assert sorted(got) == sorted(want)


def test_torch_float_state_is_quantized_on_load():
    ps, gs = params(), grads(2)
    ref = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    run(ref, ps, gs[:1])
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = fot.AdamW(ps2, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    opt.load_state_dict(ref.state_dict())
    sd = opt.state_dict()["state"]
    for i, p in enumerate(ps):
        for name in ("exp_avg", "exp_avg_sq"):
            want = ref.state[p][name].reshape(-1).numpy()
            if p.numel() < precision.MIN_8BIT_SIZE:
                assert same_bits(sd[i][name].reshape(-1).numpy(), want)
                continue
            slot = precision.int8_from_values(want, precision.INT8_SIGNED[name])
            assert np.array_equal(sd[i][name].reshape(-1).numpy(), slot.codes)
            assert same_bits(sd[i][name + "_absmax"].numpy(), slot.absmax)
            assert np.allclose(slot.dequantized(), want, rtol=0.05, atol=0.02 * np.abs(want).max())
    run(ref, ps, gs[1:])
    run(opt, ps2, gs[1:])
    assert np.allclose(flat(ps2), flat(ps), atol=2e-3)


def test_block_layout_mismatch_is_refused_before_any_change():
    ps, gs = params(), grads(1)
    opt = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    run(opt, ps, gs)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["exp_avg_absmax"] = sd["state"][2]["exp_avg_absmax"][:-1]  # 18 blocks, not 19
    other = fot.AdamW(params(), lr=1e-2, state_dtype="int8")
    run(other, other.param_groups[0]["params"], gs)
    before = [snapshot(other, p) for p in other.param_groups[0]["params"]]
    with pytest.raises(ValueError, match=r"shape \(19,\).*another block layout"):
        other.load_state_dict(sd)
    after = [snapshot(other, p) for p in other.param_groups[0]["params"]]
    assert all(same_tensors(a, b) for a, b in zip(after, before))


def test_bad_combinations_are_refused_by_name():
    with pytest.raises(ValueError, match="Rprop.*int8"):
        fot.Rprop(params(), state_dtype="int8")
    with pytest.raises(ValueError, match="SGD.*int8.*no state"):
        fot.SGD(params(), lr=0.1, state_dtype="int8")
    meta = [torch.nn.Parameter(torch.empty(4096, device="meta"))]
    with pytest.raises(TypeError, match="meta.*int8.*CPU and CUDA"):
        fot.AdamW(meta, state_dtype="int8")


def test_cpu_offload_int8_with_a_partial_step_equals_the_plain_optimizer():
    ps, gs = params(), grads(3)
    missing = [(), (0, 1)]  # the first layer has no gradient at step 1
    device_side = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    offload = fot.CPUOffload(fot.AdamW, device_side, lr=1e-2, state_dtype="int8")
    plain = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    (_, host), _ = offload.inner._buckets
    assert host.flat.data_ptr() == offload._host[0].flat.data_ptr()  # adopted, not repacked
    run(offload, device_side, gs, missing)
    run(plain, ps, gs, missing)
    assert same_bits(flat(device_side), flat(ps))
    assert all(
        same_tensors(snapshot(offload.inner, m), snapshot(plain, p))
        for m, p in zip(offload.masters, ps)
    )
    quantized = sum(
        t.codes.nbytes + t.absmax.nbytes
        for tensors, q in zip(offload.inner._tensors, offload.inner._quantized)
        if q
        for t in tensors.values()
    )
    # 2 slots of a code per element (the 128-element gap after the first weight included) and
    # an absmax per 256: 2.06 bytes per parameter here, 2.03 without the gap
    assert quantized == 2 * ((4608 + 4672) + 4 * 37)
    float_side = params()
    full = fot.CPUOffload(fot.AdamW, float_side, lr=1e-2)
    run(full, float_side, gs[:1])
    full_bytes = sum(t.nbytes for tensors in full.inner._tensors for t in tensors.values())
    state_bytes = quantized + (70 + 73) * 8  # the biases: float32 exp_avg and exp_avg_sq
    assert full_bytes / state_bytes > 3.5


def test_bf16_master_weights_with_int8_state_equal_the_core_and_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ps = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params()]
    gs = [[g.to(torch.bfloat16) for g in step] for step in grads(3)]

    def bits(t):
        return t.detach().reshape(-1).view(torch.uint16).numpy()

    arrays = [bits(p).copy().view(ml_dtypes.bfloat16).reshape(p.shape) for p in ps]
    options = {"lr": 1e-2, "state_dtype": "int8", "master_weights": True}
    core = fo.AdamW(arrays, **options)
    opt = fot.AdamW(ps, **options)
    run(opt, ps, gs[:2], [(), (1,)])
    for t, step in enumerate(gs[:2]):
        core.step(
            [
                None if (t, k) == (1, 1) else bits(g).view(ml_dtypes.bfloat16).reshape(g.shape)
                for k, g in enumerate(step)
            ]
        )
    assert all(np.array_equal(bits(p), a.reshape(-1).view(np.uint16)) for p, a in zip(ps, arrays))
    assert_state_equals_the_core(opt, core)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0][precision.MASTER].dtype == torch.float32
    assert sd["state"][0]["exp_avg_absmax"].dtype == torch.float32  # not rounded to bfloat16
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fot.AdamW(ps2, **options)
    opt2.load_state_dict(sd)
    run(opt, ps, gs[2:])
    run(opt2, ps2, gs[2:])
    assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(ps, ps2))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_host_quantizer_gives_the_kernels_codes(signed):
    # int8_from_values (a float state loaded into 8-bit state) against block_loops.code_of on
    # random values, every midpoint of the map (ties) and its neighbours
    from fastopt.kernels import block_loops

    q = block_loops.qmap(signed)
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(500).astype(np.float32) * np.float32(1e-3),
            mids,
            np.nextafter(mids, np.float32(2)),
            np.nextafter(mids, np.float32(-2)),
            [1.0, 0.0, -0.0],
        ]
    ).astype(np.float32)
    x = np.abs(x) if not signed else x
    x[:: precision.QUANT_BLOCK] = 1.0  # absmax 1 in every block: the ties stay exact ties
    slot = precision.int8_from_values(x, signed)
    scale = np.repeat(slot.absmax, precision.QUANT_BLOCK)[: x.size]
    want = [block_loops.code_of(v / s, signed) for v, s in zip(x, scale)]
    assert np.array_equal(slot.codes, np.array(want, np.uint8))
    blocks = np.abs(np.pad(x, (0, slot.absmax.size * precision.QUANT_BLOCK - x.size)))
    assert same_bits(slot.absmax, blocks.reshape(-1, precision.QUANT_BLOCK).max(axis=1))
