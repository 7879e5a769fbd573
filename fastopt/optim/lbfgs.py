"""L-BFGS with torch.optim.LBFGS's semantics, over the flat parameter vector.

The control flow is torch's ``torch/optim/lbfgs.py`` (itself after minFunc), statement for
statement: the same hyperparameters and defaults, the same state entries (``func_evals``,
``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``,
``prev_loss``, ``al``), the same stopping tests and the same strong-Wolfe line search
(:mod:`.line_search`), so the iterates and the number of closure calls match torch's. The vector
work runs on the ParamSet's flat buffer (or on one flat work vector for plain arrays) through
:mod:`fastopt.kernels.vector`: every dot product is fused into the pass of the axpy before it
and reduced deterministically (fixed chunks, fixed order, any thread count).
"""

import math

import numpy as np

from ..kernels import vector
from ..validation import check_choice, check_int, check_nonnegative
from . import lbfgs_state
from .base import Optimizer
from .line_search import TensorScalar, strong_wolfe

LINE_SEARCHES = (None, "strong_wolfe")


class _HostVectors:
    """The flat-vector operations of L-BFGS on host arrays (``kernels/vector.py``), with the
    three :func:`.line_search.strong_wolfe` needs (``dot``, ``abs_max``, ``clone``)."""

    dot = staticmethod(vector.dot)
    update_dot = staticmethod(vector.update_dot)
    scale_dot = staticmethod(vector.scale_dot)
    curvature_pair = staticmethod(vector.curvature_pair)
    abs_sum_max = staticmethod(vector.abs_sum_max)
    axpy_absmax = staticmethod(vector.axpy_absmax)
    copy = staticmethod(vector.copy)

    @staticmethod
    def abs_max(x):
        return vector.abs_sum_max(x)[1]

    @staticmethod
    def clone(x):
        return x.copy()

    @staticmethod
    def empty(n, dtype):
        return np.empty(n, dtype)

    @staticmethod
    def scale(out, c, x):
        np.multiply(x, c, out=out)

    @staticmethod
    def zero(x):
        x.fill(0)

    @staticmethod
    def to_vector(host):
        return host


class _DeviceVectors:
    """The same operations on GPU arrays of one device: numba-cuda device arrays
    (``kernels/vector_cuda.py``) or CuPy arrays (``kernels/vector_cupy.py``), the module given
    as ``kernels``, launched on ``stream`` (set by every ``step()``: the optimizer's
    ``stream=`` or the stream of the parameters' library); a reduction synchronises that
    stream alone."""

    def __init__(self, kernels, device):
        self.k = kernels
        self.device = device
        self.stream = None

    def dot(self, x, y):
        return self.k.dot(x, y, self.stream)

    def update_dot(self, q, a, x, h, z):
        return self.k.update_dot(q, a, x, h, z, self.stream)

    def scale_dot(self, out, c, x, z):
        return self.k.scale_dot(out, c, x, z, self.stream)

    def curvature_pair(self, g, pg, d, t, y, s):
        return self.k.curvature_pair(g, pg, d, t, y, s, self.stream)

    def abs_sum_max(self, x):
        return self.k.abs_sum_max(x, self.stream)

    def abs_max(self, x):
        return self.k.abs_sum_max(x, self.stream)[1]

    def axpy_absmax(self, p, a, x):
        return self.k.axpy_absmax(p, a, x, self.stream)

    def copy(self, dst, src):
        self.k.copy(dst, src, self.stream)

    def scale(self, out, c, x):
        self.k.scale(out, c, x, self.stream)

    def zero(self, x):
        self.k.fill(x, 0.0, self.stream)

    def empty(self, n, dtype):
        return self.k.empty(n, dtype, self.device, self.stream)

    def clone(self, x):
        out = self.empty(x.size, x.dtype)
        self.copy(out, x)
        return out

    def to_vector(self, host):
        return self.k.to_device(host, self.device, self.stream)

    def synchronize(self):
        """Wait for the work launched on ``stream`` before host copies of the vectors, which
        numba-cuda makes on the default stream and CuPy on its current one."""
        self.k.synchronize(self.device, self.stream)


class LBFGS(Optimizer):
    """L-BFGS (Nocedal & Wright, *Numerical Optimization*, Algorithm 7.4 and 7.5) as
    ``torch.optim.LBFGS``: ``lr`` (default 1), ``max_iter`` iterations per ``step()`` (20),
    ``max_eval`` closure calls per ``step()`` (``max_iter * 5 // 4``), ``tolerance_grad`` on
    ``max |g|`` (1e-7), ``tolerance_change`` on the change of loss and parameters (1e-9),
    ``history_size`` curvature pairs (100), ``line_search_fn`` None (fixed step ``lr``) or
    ``"strong_wolfe"``. ``backend``: as for the other optimizers (CuPy arrays run the
    ``"cupy"`` backend, other GPU arrays ``"numba-cuda"``, unless named).

    ``step(closure)`` re-evaluates the objective as often as the algorithm needs:

    - over a ParamSet, ``closure()`` writes the gradient into ``ps.grads`` and returns the loss
      (as a torch closure fills ``.grad``);
    - over plain arrays (one, or a list/tuple/dict), ``closure()`` returns ``(loss, grads)``
      with ``grads`` in the params' structure (a None gradient counts as zeros, as torch's
      missing ``.grad``).

    It returns the loss of the first evaluation. The loss must be a finite real number and the
    gradients must fit the parameters, else TypeError/ValueError: on the first evaluation of a
    ``step()`` before anything is written. An exception from a later evaluation (these checks',
    or the closure's own) abandons the step and leaves the optimizer as its last completed
    iteration left it, consistent with the parameters: the state (``n_iter``, ``func_evals``,
    the direction, step, history and previous gradient) is updated only when an iteration
    completes, so a later ``step()`` resumes from there. With the line search the parameters go
    back to the start of the interrupted iteration (where its trial points were measured
    from); with a fixed step the iteration completed by moving them, and the evaluation that
    failed was the next one's, at the point the parameters are at. (torch updates its state
    as it goes: after such an exception its ``n_iter``, ``func_evals``, history and previous
    gradient include the interrupted iteration but its direction and step do not, and the
    parameters stay at the trial point.)

    Like torch: one param group only; the parameters must share one dtype, here float32 or
    float64 (no 16-bit storage: TypeError at construction); memory is about
    ``(2 * history_size + 7)`` copies of the parameters (the history and a spare pair; the
    direction and the previous gradient twice each, an iteration writing its own beside the
    state's; the gathered gradient). Host arrays (NumPy, torch CPU tensors, a host ParamSet)
    run ``kernels/vector.py``; arrays on a GPU run the same passes in ``kernels/vector_cuda.py``
    (backend ``"numba-cuda"``) or in the CUDA C kernels of ``kernels/vector_cupy.py`` (backend
    ``"cupy"``): deterministic tree reductions, one host read per dot product (synchronising
    the step's stream alone: ``stream=``, a torch/CuPy/numba stream or handle, else the current
    stream of the parameters' library, :mod:`fastopt.streams`), the same bits on both GPU backends. All parameters live on the
    host or all on one GPU with one backend. Reductions accumulate in float64 for float32
    parameters too (torch's float32 dot products round in float32).

    Not elementwise, so not a rule of the fused kernels: ``step()`` takes a closure, not
    gradients (``requires_closure`` is True), and ``max_grad_norm``/``skip_nonfinite`` are not
    offered.
    """

    algorithm = "lbfgs"
    requires_closure = True
    elementwise = False

    def __init__(
        self,
        params,
        lr=1.0,
        max_iter=20,
        max_eval=None,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
        history_size=100,
        line_search_fn=None,
        *,
        backend=None,
        stream=None,
    ):
        check_int("max_iter", max_iter, lo=1)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults, backend=backend, stream=stream)
        units = self.units()
        if len({u.device for u in units}) > 1:
            raise TypeError("LBFGS needs all parameters on the host or all on one GPU")
        self._vec = _HostVectors
        if units[0].device is not None:
            self._vec = _device_vectors(units)
        dtypes = {u.param.dtype for u in units}
        if len(dtypes) != 1:
            raise TypeError(f"LBFGS needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self._dtype = units[0].param.dtype
        if self._dtype not in (np.float32, np.float64):
            raise TypeError(
                f"LBFGS takes float32 or float64 parameters, got {self._dtype} (its vector "
                "kernels have no 16-bit storage; keep a float32 copy of the parameters)"
            )
        self._numel = sum(u.param.size for u in units)
        self._paramset = self._groups[0]["structure"] == "paramset"
        self._gbuf = None  # gathered gradient of plain arrays, reused by every evaluation
        self._spare = None  # (y, s) buffers for the next curvature pair
        self._spare_d = None  # buffer for the next direction (the state's d is the last one)
        self._spare_g = None  # buffer for the next previous gradient (likewise)

    def add_param_group(self, param_group):
        """As torch: LBFGS takes exactly one param group (no per-parameter options)."""
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(param_group)

    def _check(self, group):
        lr = group["lr"]
        if callable(lr):
            raise TypeError("LBFGS takes a constant lr (a number), not a schedule")
        check_nonnegative("lr", lr)
        check_int("max_iter", group["max_iter"], lo=1)
        check_int("max_eval", group["max_eval"], lo=1)
        check_nonnegative("tolerance_grad", group["tolerance_grad"])
        check_nonnegative("tolerance_change", group["tolerance_change"])
        check_int("history_size", group["history_size"], lo=1)
        if group["line_search_fn"] is not None:
            check_choice("line_search_fn", group["line_search_fn"], ("strong_wolfe",))

    # ------------------------------------------------------------------ flat vector
    def _new_vector(self):
        return self._vec.empty(self._numel, self._dtype)

    def _segments(self, flat):
        """(unit, slice of ``flat``) per unit: the flat vector cut like the parameters."""
        out, off = [], 0
        for u in self.units():
            out.append((u, flat[off : off + u.param.size]))
            off += u.param.size
        return out

    def _add_grad(self, t, d):
        """Parameters ``+= t * d``; returns ``max |d|``."""
        return max(self._vec.axpy_absmax(u.param, t, seg) for u, seg in self._segments(d))

    def _clone_param(self):
        x = self._new_vector()
        for u, seg in self._segments(x):
            self._vec.copy(seg, u.param)
        return x

    def _set_param(self, x):
        for u, seg in self._segments(x):
            self._vec.copy(u.param, seg)

    def _evaluate(self, closure):
        """(what the closure returned as loss, loss as float, flat gradient): the gradient is
        the ParamSet's buffer or this optimizer's gather buffer, overwritten by the next call."""
        result = closure()
        if self._paramset:
            if isinstance(result, tuple):
                raise TypeError(
                    "LBFGS over a ParamSet: the closure writes ps.grads and returns the loss, "
                    "not a tuple"
                )
            loss = _finite_loss(result)
            grad = self.units()[0].default_grad
            self.check_grads(None)  # the parameter buffer must still be writable
            return result, loss, grad
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(
                "LBFGS over plain arrays: the closure returns (loss, grads), grads in the "
                f"structure of the params; it returned a {type(result).__name__}"
            )
        loss = _finite_loss(result[0])
        if result[1] is None:
            raise TypeError("LBFGS over plain arrays: the closure returned no gradients (None)")
        pairs = self.check_grads(result[1])
        for u, g in pairs:
            if g.dtype != self._dtype:  # the flat vector has one dtype (the steps may mix them)
                raise TypeError(
                    f"LBFGS: the gradient of {u.label} has dtype {g.dtype}, the parameters "
                    f"{self._dtype}; the closure must return gradients of the parameters' dtype"
                )
        given = {id(u): g for u, g in pairs}
        if self._gbuf is None:
            self._gbuf = self._new_vector()
        for u, seg in self._segments(self._gbuf):
            g = given.get(id(u))
            if g is None:
                self._vec.zero(seg)
            else:
                self._vec.copy(seg, g)
        return result[0], loss, self._gbuf

    # ------------------------------------------------------------------ the step
    def step(self, closure):
        """Up to ``max_iter`` L-BFGS iterations (torch's ``LBFGS.step``); returns the loss of
        the first closure call."""
        if not callable(closure):
            raise TypeError(
                "LBFGS.step takes a closure that re-evaluates the loss and gradient, got "
                f"{type(closure).__name__}"
            )
        group = self.param_groups[0]
        self._check(group)
        if group["params"] is not self._groups[0]["source"]:
            raise ValueError("param_groups[0]['params'] was replaced; create a new LBFGS")
        lr = float(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]

        self._bind_stream()
        orig_loss, loss, flat_grad = self._evaluate(closure)  # first: checked before any write
        state = self.units()[0].state
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        current_evals = 1
        state["func_evals"] += 1

        vec = self._vec
        g_abs_sum, g_abs_max = vec.abs_sum_max(flat_grad)
        if g_abs_max <= tolerance_grad:
            return orig_loss

        # Each iteration writes its direction, curvature pair and previous gradient into spare
        # buffers and commits them to the state only when it completes (torch's end-of-step
        # state.update, done per iteration): an exception in between leaves the state of the
        # last completed iteration, which the parameters match (see the class docstring).
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            k = state["n_iter"] + 1  # torch's state["n_iter"] += 1, committed with the rest

            # ---- the descent direction
            d = self._spare_d if self._spare_d is not None else self._new_vector()
            new = {"n_iter": k, "d": d}
            if k == 1:
                vec.scale(d, -1.0, flat_grad)
                new.update(old_dirs=[], old_stps=[], ro=[], H_diag=1)
                spare = self._spare
            else:
                y, s = self._spare or (self._new_vector(), self._new_vector())
                ys, yy = vec.curvature_pair(
                    flat_grad, state["prev_flat_grad"], state["d"], state["t"], y, s
                )
                dirs, stps, ro = list(state["old_dirs"]), list(state["old_stps"]), list(state["ro"])
                H_diag = state["H_diag"]
                if ys > 1e-10:
                    spare = None
                    if len(dirs) == history_size:  # drop the oldest pair, reuse its memory
                        spare = (dirs.pop(0), stps.pop(0))
                        ro.pop(0)
                    dirs.append(y)
                    stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / yy
                else:
                    spare = (y, s)
                al = list(state["al"]) if "al" in state else [None] * history_size
                _two_loop(vec, flat_grad, d, dirs, stps, ro, H_diag, al)
                new.update(old_dirs=dirs, old_stps=stps, ro=ro, H_diag=H_diag, al=al)

            prev_flat_grad = self._spare_g if self._spare_g is not None else self._new_vector()
            vec.copy(prev_flat_grad, flat_grad)
            prev_loss = loss
            new.update(prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)

            # ---- the step length
            if k == 1:
                # torch: min(1.0, 1.0 / flat_grad.abs().sum()) * lr, the quotient a tensor
                t = min(1.0, TensorScalar(1.0 / g_abs_sum)) * lr
            else:
                t = lr
            gtd = vec.dot(flat_grad, d)
            if gtd > -tolerance_change:
                self._commit(state, new, t, spare)
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                x_init = self._clone_param()

                def obj_func(t_trial, x_init=x_init, d=d):
                    self._add_grad(t_trial, d)
                    try:
                        _, f, g = self._evaluate(closure)
                    finally:  # also when the closure raises: back to the iteration's start
                        self._set_param(x_init)
                    return f, g

                loss, flat_grad, t, ls_func_evals = strong_wolfe(
                    obj_func, t, d, loss, flat_grad, gtd, vec, max_ls=max_eval - current_evals
                )
                d_abs_max = self._add_grad(t, d)
                self._commit(state, new, t, spare)
                opt_cond = vec.abs_max(flat_grad) <= tolerance_grad
            else:
                d_abs_max = self._add_grad(t, d)
                self._commit(state, new, t, spare)
                if n_iter != max_iter:
                    # as torch: no re-evaluation after the last iteration
                    _, loss, flat_grad = self._evaluate(closure)
                    opt_cond = vec.abs_max(flat_grad) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            # ---- stopping tests
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if abs(t) * d_abs_max <= tolerance_change:  # max |t*d|: rounding is monotone
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        return orig_loss

    def _commit(self, state, new, t, spare):
        """A completed iteration: its entries ``new`` and step ``t`` into ``state``; the
        direction and previous gradient they replace become the spare buffers the next
        iteration writes, and ``spare`` the (y, s) pair it fills."""
        self._spare_d, self._spare_g = state.get("d"), state.get("prev_flat_grad")
        self._spare = spare
        state.update(new, t=t)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """torch's LBFGS layout: ``{"algorithm", "state": {0: {func_evals, n_iter, d, t,
        old_dirs, old_stps, ro, H_diag, prev_flat_grad, prev_loss, al}}, "param_groups"}``,
        vectors as flat NumPy copies (the history as lists of them), read after the stream of
        the last step (on a GPU) is synchronised."""
        if isinstance(self._vec, _DeviceVectors):
            self._vec.synchronize()
        return lbfgs_state.state_dict(self)

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict` of an LBFGS over as many parameters; everything is
        checked (keys, types, lengths, history sizes) before anything changes."""
        self._bind_stream()
        lbfgs_state.load_state_dict(self, state_dict)
        self._spare = self._spare_d = self._spare_g = None

    def _bind_stream(self):
        """GPU: launch on the optimizer's ``stream=``, else the current stream of the
        parameters' library (``fastopt.streams``)."""
        if isinstance(self._vec, _DeviceVectors):
            self._vec.stream = self.step_streams()(self.units()[0])


def _device_vectors(units):
    """The vector operations of the units' GPU backend (one for all of them), else TypeError."""
    first = units[0]
    for u in units:
        if u.backend is None or u.backend.name not in ("cupy", "numba-cuda"):
            name = "no backend" if u.backend is None else f"backend {u.backend.name!r}"
            raise TypeError(
                f"LBFGS on a GPU runs the cupy or numba-cuda vector kernels; {u.label} has "
                f"{name} (pass backend='cupy' or backend='numba-cuda')"
            )
        if u.backend is not first.backend:
            raise TypeError(
                f"LBFGS runs one backend's vector kernels; {first.label} has backend "
                f"{first.backend.name!r}, {u.label} {u.backend.name!r} (pass backend='cupy' or "
                "backend='numba-cuda')"
            )
    if first.backend.name == "cupy":
        from ..kernels import vector_cupy as kernels
    else:
        from ..kernels import vector_cuda as kernels
    return _DeviceVectors(kernels, first.backend.device_of(first.param))


def _two_loop(vec, flat_grad, d, old_dirs, old_stps, ro, H_diag, al):
    """``d <- -H g`` with the L-BFGS inverse-Hessian approximation H (the two-loop recursion,
    Nocedal & Wright Algorithm 7.4; torch's single-buffer form), ``al`` torch's scratch list,
    ``vec`` the vector operations of the parameters' device. Each dot product is fused into the
    pass of the update before it."""
    m = len(old_dirs)
    if m == 0:
        vec.scale(d, -H_diag, flat_grad)  # (-g) * H_diag, exactly
        return
    dot = vec.scale_dot(d, -1.0, flat_grad, old_stps[m - 1])  # q = -g; s_{m-1} . q
    for i in range(m - 1, 0, -1):
        al[i] = dot * ro[i]
        dot = vec.update_dot(d, -al[i], old_dirs[i], 1.0, old_stps[i - 1])
    al[0] = dot * ro[0]
    dot = vec.update_dot(d, -al[0], old_dirs[0], H_diag, old_dirs[0])  # r = q * H_diag
    for i in range(m):
        be_i = dot * ro[i]
        if i + 1 < m:
            dot = vec.update_dot(d, al[i] - be_i, old_stps[i], 1.0, old_dirs[i + 1])
        else:
            vec.axpy_absmax(d, al[i] - be_i, old_stps[i])


def _finite_loss(value):
    """The closure's loss as a float: TypeError unless it is a real scalar, ValueError unless
    it is finite."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"the closure's loss must be a real number, got {value!r}")
    try:
        loss = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the closure's loss must be a real number (a scalar), got {type(value).__name__}"
        ) from exc
    if not math.isfinite(loss):
        raise ValueError(f"the closure returned a non-finite loss ({loss})")
    return loss
