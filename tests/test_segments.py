"""Per-segment work (the matrix issue): the segmented reduction of kernels/segment_loops.py and
LAMB, LARS, NovoGrad over it.

- the piece layout; per-segment sums of squares against NumPy;
- identical bits for 1 and 2 Numba threads (child processes with NUMBA_NUM_THREADS);
- (the numba-cuda templates under the CUDA simulator: tests/test_segments_sim.py);
- the ParamSet path equals the list path bit for bit;
- each optimizer against the NumPy reference (float64, 1e-12), including zero-norm tensors.
"""

import numpy as np
import pytest
import thread_counts

import fastopt as fo
from fastopt.kernels import segment_cpu, segment_loops

SHAPES = {"w": (30, 40), "b": (40,), "z": (7,), "e": (100, 300)}

CASES = {
    "lamb": (fo.LAMB, dict(lr=0.01, weight_decay=0.1, weight_decay_mask=lambda n, s: len(s) > 1)),
    "lamb_max": (fo.LAMB, dict(lr=0.02, betas=(0.8, 0.99), eps_root=1e-8, maximize=True)),
    "lars": (fo.LARS, dict(lr=0.1, weight_decay=0.01, trust_ratio_mask=lambda n, s: len(s) > 1)),
    "lars_nesterov": (fo.LARS, dict(lr=0.5, weight_decay=0.1, nesterov=True, eps=1e-3)),
    "novograd": (fo.NovoGrad, dict(lr=0.01, weight_decay=0.01)),
    "novograd_max": (fo.NovoGrad, dict(lr=0.05, betas=(0.5, 0.9), maximize=True)),
}


def _init(dtype, zero=None):
    out = {}
    for i, (k, s) in enumerate(SHAPES.items()):
        out[k] = np.random.default_rng(i).standard_normal(s).astype(dtype)
    if zero is not None:
        out[zero][...] = 0
    return out


def _grads(t, dtype, zero_grad=None):
    out = {}
    for i, (k, s) in enumerate(SHAPES.items()):
        out[k] = np.random.default_rng(100 * t + i).standard_normal(s).astype(dtype)
    if zero_grad is not None:
        out[zero_grad][...] = 0
    return out


def run(name, backend, *, dtype=np.float64, steps=6, paramset=True, zero=None, zero_grad=None):
    cls, kw = CASES[name]
    init = _init(dtype, zero)
    if paramset:
        ps = fo.ParamSet(init)
        opt = cls(ps, backend=backend, **kw)
        for t in range(steps):
            for k, g in _grads(t, dtype, zero_grad).items():
                ps.grads[k][...] = g
            opt.step()
        return np.concatenate([ps[k].ravel() for k in SHAPES])
    arrays = [init[k].copy() for k in SHAPES]
    opt = cls(arrays, backend=backend, **kw)
    for t in range(steps):
        opt.step(list(_grads(t, dtype, zero_grad).values()))
    return np.concatenate([a.ravel() for a in arrays])


def test_pieces_cut_each_segment_from_its_start():
    lo, hi, seg, first = segment_loops.pieces([0, 3, 3, 40003, 41003], chunk=16384)
    assert lo.tolist() == [0, 3, 16387, 32771, 40003]
    assert hi.tolist() == [3, 16387, 32771, 40003, 41003]
    assert seg.tolist() == [0, 2, 2, 2, 3]
    assert first.tolist() == [0, 1, 1, 4, 5]
    with pytest.raises(ValueError, match="bounds"):
        segment_loops.pieces([1, 4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_sums_match_numpy(dtype):
    rng = np.random.default_rng(0)
    sizes = [3, 0, 40000, 1000, 17000, 5]
    b = np.concatenate([[0], np.cumsum(sizes)])
    layout = segment_loops.pieces(b)
    p, g = rng.standard_normal((2, b[-1])).astype(dtype)
    ns = len(sizes)
    out = np.empty((layout[0].size, 2))
    sums = np.empty((ns, 2))
    flags = np.zeros(ns, np.int32)
    h, gs = (dtype(-1.0),), (dtype(2.0), dtype(0.0))
    segment_cpu.reduce("segment_norms", p, g, [], h, gs, flags, layout, out)
    r = np.zeros((ns, 2), dtype)
    segment_cpu.segment(
        "segment_norms", p, flags, layout, out, np.zeros(ns, dtype), r, sums, (-1.0,)
    )
    for s in range(ns):
        x = p[b[s] : b[s + 1]].astype(np.float64)
        y = 2 * g[b[s] : b[s + 1]].astype(np.float64)
        np.testing.assert_allclose(sums[s], [x @ x, y @ y], rtol=1e-13)


@pytest.mark.parametrize("name", sorted(CASES))
def test_against_reference(name):
    got = run(name, "numba-cpu")
    want = run(name, "numpy")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paramset_path_equals_list_path(name, dtype):
    a = run(name, "numba-cpu", dtype=dtype)
    b = run(name, "numba-cpu", dtype=dtype, paramset=False)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", ["lamb", "lars", "novograd"])
def test_zero_norm_tensors(name):
    # A zero parameter tensor (trust ratio 1 as optax) and a zero gradient tensor.
    got = run(name, "numba-cpu", zero="b", zero_grad="z", steps=3)
    want = run(name, "numpy", zero="b", zero_grad="z", steps=3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    assert np.isfinite(got).all()


def test_lamb_trust_ratio_on_one_tensor():
    # One step by hand: u = m_hat / (sqrt(v_hat) + eps) = sign(g) / (1 + eps/|g|), r = |p|/|u|.
    p = np.array([3.0, 4.0])
    g = np.array([0.5, -2.0])
    fo.LAMB([p], lr=0.1, eps=0.0).step([g])
    u = np.sign(g)
    np.testing.assert_allclose(p, [3.0, 4.0] - 0.1 * (5.0 / np.sqrt(2.0)) * u, rtol=1e-15)


def test_masks_are_checked():
    with pytest.raises(TypeError, match="weight_decay_mask"):
        fo.LAMB([np.zeros(3)], weight_decay_mask="yes")
    opt = fo.LARS([np.zeros(3)], trust_ratio_mask=lambda n, s: "no")
    p0 = opt.sources()[0][0].copy()
    with pytest.raises(TypeError, match="trust_ratio_mask"):
        opt.step([np.ones(3)])
    assert np.array_equal(opt.sources()[0][0], p0)


def child_digests():
    """Run in a child process: sha-like bytes of LAMB/LARS/NovoGrad over > PARALLEL_THRESHOLD."""
    out = {}
    sizes = {"a": (300, 200), "b": (50_000,), "c": (9,)}
    for cls in (fo.LAMB, fo.LARS, fo.NovoGrad):
        ps = fo.ParamSet({k: np.random.default_rng(1).standard_normal(s) for k, s in sizes.items()})
        assert ps.size >= segment_cpu.PARALLEL_THRESHOLD
        opt = cls(ps, lr=0.01, weight_decay=0.01)
        for t in range(3):
            ps.grad_flat[...] = np.random.default_rng(t).standard_normal(ps.size)
            opt.step()
        out[cls.__name__] = ps.flat.tobytes().hex()
    return out


def _digests(threads):
    return thread_counts.digests(__name__, threads)


def test_two_threads_give_the_bits_of_one():
    one, two = _digests(1), _digests(2)
    assert set(one) == {"LAMB", "LARS", "NovoGrad"}
    assert one == two


LAYOUTS = {
    "pieces": ([3, 0, 700, 300, 5], 512),
    # pieces of 3 full rows and a part, of more than one STORED_BLOCK, and of a whole row pair
    "rows": ([3, 1000, 2600, 5000, 0, 512], 4096),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stored_update_launches_equal_the_recomputing_ones(dtype, layout):
    """LAMB on the CPU (rules.STORED_UPDATE) stores each element's update in the reduction and
    applies it from there, stepping the segments of one piece in the reduction itself: the same
    bits as the reduction + segment pass + apply that compute the update twice (the templates
    the GPU backends run), for the sums, the segment scalars, the parameters and the state, over
    empty, one-piece and two-piece segments, masked and unmasked. The serial kernels (the prange
    ones run the same body per piece, and the thread-count test above covers them; their
    compile would double this test's time)."""
    parallel = False
    sizes, chunk = LAYOUTS[layout]
    b = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi, seg, first = segment_loops.pieces(b, chunk=chunk)
    h64 = (1, 0.9, 0.1, 0.999, 0.001, 0.1, 0.001, 1e-6, 1e-9, 0.01, 0.1)
    h = tuple(dtype(x) for x in h64)
    gs = (dtype(1.5), dtype(2.0))
    flags = np.array([3, 1, 2, 0, 3, 1][: len(sizes)], np.int32)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(b[-1]).astype(dtype) for _ in range(4)]
    base[3] = np.abs(base[3])
    # magnitudes over 2^+-3: then the float64 lane sums of float64 squares round, and adding
    # a lane's squares out of order changes a piece's sum (checked by swapping two of them)
    base[0] *= (2.0 ** rng.integers(-3, 4, b[-1])).astype(dtype)
    results = []
    for stored in (True, False):
        p, g, m, v = (a.copy() for a in base)
        out, r = np.zeros((lo.size, 2)), np.zeros((len(sizes), 2), dtype)
        st, sums = np.zeros(len(sizes), dtype), np.zeros((len(sizes), 2))
        if stored:
            reduce_k, seg_k, apply_k = segment_cpu.stored_kernels("lamb", parallel)
            u = np.full_like(p, np.nan)
            reduce_k(p, g, m, v, h + gs, flags, lo, hi, seg, out, u, first, st, r, sums, h64)
            seg_k(first, out, flags, st, r, sums, h64)
            apply_k(p, u, lo, hi, seg, first, r)
        else:
            reduce_k, seg_k, apply_k = segment_cpu.kernels("lamb", parallel)
            reduce_k(p, g, m, v, h + gs, flags, lo, hi, seg, out)
            seg_k(first, out, flags, st, r, sums, h64)
            apply_k(p, g, m, v, h + gs, flags, lo, hi, seg, r)
        results.append([a.tobytes() for a in (p, m, v, out, r, st, sums)])
    assert results[0] == results[1]
    assert not np.array_equal(base[0], p)  # the step moved the parameters


@pytest.mark.parametrize("paramset", [True, False], ids=["paramset", "list"])
def test_novograd_per_tensor_state_round_trips(paramset, tmp_path):
    """NovoGrad's exp_avg_sq holds one value per tensor: state_dict gives it that shape, a
    checkpoint restores it and training continues bit for bit; a wrong length is refused."""
    import fastopt as fo

    shapes = {"a": (4, 5), "b": (7,), "c": (3, 2)}
    rng = np.random.default_rng(2)

    def build():
        arrays = {
            k: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s)
            for k, s in shapes.items()
        }
        params = fo.ParamSet(arrays) if paramset else arrays
        return params, fo.NovoGrad(params, lr=0.01)

    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)
    ]

    def step(params, opt, g):
        if paramset:
            for k in shapes:
                params.grads[k][...] = g[k]
            opt.step()
        else:
            opt.step(g)

    p1, o1 = build()
    for g in grads[:3]:
        step(p1, o1, g)
    sd = o1.state_dict()
    seg = [e["exp_avg_sq"].shape for e in sd["state"].values()]
    assert seg == ([(3,)] if paramset else [(1,)] * 3)
    fo.save(tmp_path / "n", params=p1 if paramset else dict(p1), optimizer=o1)
    p2, o2 = build()
    fo.load(tmp_path / "n").restore(params=p2 if paramset else dict(p2), optimizer=o2)
    for g in grads[3:]:
        step(p1, o1, g)
        step(p2, o2, g)
    for k in shapes:
        assert p1[k].tobytes() == p2[k].tobytes()
    bad = o1.state_dict()
    first = next(iter(bad["state"]))
    bad["state"][first]["exp_avg_sq"] = np.zeros(5, np.float32)
    before = o2.state_dict()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        o2.load_state_dict(bad)
    assert (
        o2.state_dict()["state"][first]["exp_avg_sq"].tobytes()
        == before["state"][first]["exp_avg_sq"].tobytes()
    )


@pytest.mark.parametrize("name", ["lamb", "lars", "novograd"])
def test_16bit_storage_on_a_backend_without_it_is_refused_before_any_write(name):
    """16-bit storage runs through float32 copies (tests/test_staged_precision.py) on the
    backends that store 16 bits; the NumPy reference does not: a 16-bit gradient of a float32
    parameter is refused at the step with nothing written."""
    import ml_dtypes

    import fastopt as fo

    cls = fo.optim.OPTIMIZERS[name]
    w = np.ones((3, 4), np.float32)
    opt = cls([w], lr=0.1, backend="numpy")
    with pytest.raises(TypeError, match="needs gradients of the parameter's dtype"):
        opt.step([np.ones((3, 4), ml_dtypes.bfloat16)])
    assert np.all(w == 1)
    assert not opt.state_dict()["state"]


def test_layouts_with_a_segment_of_several_pieces_are_told_apart():
    """The CPU's stored-update LAMB skips its segment and apply launches when every segment is
    one piece (the reduction stepped them): an empty segment next to one of two pieces has as
    many pieces as segments, and still needs them."""
    assert not segment_loops.has_multi_piece(segment_loops.pieces([0, 3, 3, 515], chunk=512)[3])
    first = segment_loops.pieces([0, 0, 700], chunk=512)[3]
    assert first[-1] == 2  # two pieces, two segments
    assert segment_loops.has_multi_piece(first)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_a_mask_refused_on_a_later_tensor_allocates_no_state(name):
    """Every tensor's masks are called before the first tensor's state is allocated: a mask
    that fails on the second tensor leaves the optimizer as it was."""
    import fastopt as fo

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    before = w.copy(), b.copy()
    opt = fo.optim.OPTIMIZERS[name](
        [w, b], lr=0.1, weight_decay=0.1, weight_decay_mask=lambda i, s: True if i == 0 else 1
    )
    with pytest.raises(TypeError, match="not a bool"):
        opt.step([np.ones_like(w), np.ones_like(b)])
    assert not opt.state_dict()["state"]
    assert w.tobytes() == before[0].tobytes() and b.tobytes() == before[1].tobytes()
