"""Exponential moving average of parameters (Polyak averaging), one fused kernel per update."""

from contextlib import contextmanager

import numpy as np

from . import arrays, dispatch, streams
from .kernels.access import Storage, is_plain
from .optim.precision import check_backend_stores, is_16bit
from .paramset import ParamSet
from .paramset_layout import layout_mismatch, paramset_layout
from .structure import flat_arrays
from .validation import check_bool, check_interval


class EMA:
    r"""A running exponential average of parameters, for evaluation with smoother weights.

    .. math:: \bar\theta_0 = \theta_0,\qquad \bar\theta_t = \bar\theta_{t-1} + (1-d_t)(\theta_t - \bar\theta_{t-1})

    with :math:`d_t` = ``decay``, or :math:`\min(d, (1+t)/(10+t))` when ``warmup`` (the
    ``num_updates`` form of TensorFlow's ExponentialMovingAverage). The first ``update()`` copies
    the parameters, as ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``;
    later ones are the same lerp, one kernel call per array (one for a whole ParamSet).
    References: Polyak & Juditsky, SIAM J. Control Optim. 1992; Dive into Deep Learning ch. 12.5.

    ``params``: a ParamSet, an array, or a list/tuple/dict of arrays (the live parameters, read
    at each ``update()``). ``with ema.swapped(): ...`` puts the averages into the parameters for
    evaluation and restores the trained values afterwards, even if the block raises.

    Inside ``swapped()`` the parameters hold the averages and (for parameters of the averages'
    dtype) the averages' arrays hold the trained values, so anything that writes either would
    be undone or would corrupt one of them when the block exits: ``update()`` (and
    ``AveragedModel.update_parameters()``), ``load_state_dict()``, ``copy_to_params()`` and a
    nested ``swapped()`` raise RuntimeError there, before writing anything, as does reading
    :attr:`averages` (its arrays hold the trained values until the block exits).
    ``state_dict()`` works inside the block and returns the averages.

    ``stream``: the CUDA stream the averaging kernels run on (a torch/CuPy/numba stream or a
    handle); by default the current stream of the library that owns each array
    (:mod:`fastopt.streams`).

    16-bit parameters (bfloat16, float16) are averaged in float32: the averages are float32
    arrays, the lerp reads the 16-bit parameter widened and rounds nothing. A 16-bit average
    would stall: with ``decay=0.999`` each update moves the average by 0.1% of its distance to
    the parameter, below half a bfloat16 ulp (2^-9 relative), so rounding to nearest would
    return the old average every time. ``swapped()`` and ``copy_to_params()`` write the
    averages into the parameters rounded to nearest even; ``swapped()`` restores the trained
    16-bit values exactly (a copy, not the rounded average). Backends without 16-bit kernels
    refuse 16-bit parameters by name (TypeError) at construction.
    """

    def __init__(self, params, decay=0.999, *, warmup=False, stream=None):
        check_interval("decay", decay, 0.0, 1.0, hi_closed=True)
        check_bool("warmup", warmup)
        self.decay = float(decay)
        self.warmup = warmup
        self._stream = streams.handle(stream)
        self._params = (
            [params.flat] if isinstance(params, ParamSet) else flat_arrays(params, "params")
        )
        self._shapes = [params.flat.shape] if isinstance(params, ParamSet) else _shapes_of(params)
        self._layout = paramset_layout(params)
        for p in self._params:
            if not p.flags.writeable:
                raise ValueError("EMA parameters must be writable (swapped() writes them)")
        self._backends = [dispatch.backend_for([p]) for p in self._params]
        self._storages = [_storage_of(p.dtype) for p in self._params]
        for i, (b, s) in enumerate(zip(self._backends, self._storages)):
            check_backend_stores(b, s, f"EMA params[{i}]")
        self._averages = [
            b.zeros(p.size, _average_dtype(p.dtype), like=p, stream=self._launch_stream(p))
            for b, p in zip(self._backends, self._params)
        ]
        self.num_updates = 0
        self._saved = None  # the 16-bit parameters' own values while swapped()
        self._swapped = False  # inside swapped(): parameters and averages exchanged

    def _refuse_while_swapped(self, what):
        """RuntimeError if called inside ``swapped()`` (see the class docstring)."""
        if self._swapped:
            raise RuntimeError(
                f"{type(self).__name__}.{what} inside `with swapped():`: until the block "
                "exits the parameters hold the averages and the averages' arrays the trained "
                "values (restored on exit), so this would be lost or mix them up; call it "
                "after the block"
            )

    def current_decay(self):
        """The decay the next update() will use."""
        if self.warmup:
            t = self.num_updates
            return min(self.decay, (1 + t) / (10 + t))
        return self.decay

    def update(self):
        """Fold the current parameters into the average (RuntimeError inside ``swapped()``)."""
        self._refuse_while_swapped("update()")
        if self.num_updates == 0:  # the copy (widening) on the device, on the EMA's stream
            for b, avg, p in zip(self._backends, self._averages, self._params):
                b.copy(avg, p, self._launch_stream(p))
        else:
            weight, decay = self._lerp_weights()
            for b, avg, p, s in zip(self._backends, self._averages, self._params, self._storages):
                st = b.scalar_type(avg.dtype)
                h, gs = (st(weight), st(decay)), (st(1.0), st(0.0))
                if is_plain(s):
                    b.update("ema", avg, p, [], h, gs, None, self._launch_stream(p))
                else:  # the average is the rule's "parameter", the 16-bit parameter its input
                    b.update_storage(
                        "ema", s, avg, p, [], None, h, gs, (0, 0, 0), self._launch_stream(p)
                    )
        self.num_updates += 1

    def _lerp_weights(self):
        """(w, 1 - w) of the next update's ``avg.lerp_(param, w)``: w = 1 - decay."""
        d = self.current_decay()
        return 1.0 - d, d

    def _launch_stream(self, p):
        """The stream handle of the kernels over parameter ``p`` (see the class docstring)."""
        return self._stream if self._stream is not None else streams.current(p)

    @property
    def averages(self):
        """The averaged arrays (views shaped like the parameters; a ParamSet's as one flat array).
        RuntimeError inside ``swapped()``, where the parameters hold the averages."""
        self._refuse_while_swapped("averages")
        return [a.reshape(s) for a, s in zip(self._averages, self._shapes)]

    def copy_to_params(self):
        """Overwrite the parameters with the averages (e.g. before exporting a model);
        RuntimeError inside ``swapped()``."""
        self._refuse_while_swapped("copy_to_params()")
        for b, avg, p in zip(self._backends, self._averages, self._params):
            b.copy(p, avg, self._launch_stream(p))  # rounded to nearest even for 16-bit

    @contextmanager
    def swapped(self):
        """Within the block the parameters hold the averages; afterwards their own values.
        Not nested; ``update()``, ``load_state_dict()`` and ``copy_to_params()`` raise
        RuntimeError within it (see the class docstring)."""
        self._refuse_while_swapped("swapped()")
        if self.num_updates == 0:
            raise RuntimeError("EMA.swapped() before any update(): there is no average yet")
        self._swap()
        self._swapped = True
        try:
            yield self
        finally:
            self._swapped = False
            self._swap()

    def _swap(self):
        """Exchange parameters and averages; for a 16-bit parameter (float32 average) the
        trained values are kept in ``_saved`` on the way in and written back on the way out."""
        swapping_in = self._saved is None
        saved = [] if swapping_in else self._saved
        # every copy through the backend, on the EMA's stream: numba device arrays have no
        # copy(), and their ``a[...] = b`` compiles a kernel that cannot type bfloat16
        for b, avg, p in zip(self._backends, self._averages, self._params):
            s = self._launch_stream(p)
            if avg.dtype == p.dtype:
                tmp = b.clone(p, s)
                b.copy(p, avg, s)
                b.copy(avg, tmp, s)
            elif swapping_in:
                saved.append(b.clone(p, s))
                b.copy(p, avg, s)  # rounded to nearest even
            else:
                b.copy(p, saved.pop(0), s)
        self._saved = saved if swapping_in else None

    @property
    def paramset_layout(self):
        """The :func:`paramset_layout` of the ParamSet this EMA averages (None for other params)."""
        return None if self._layout is None else [[n, list(s)] for n, s in self._layout]

    def state_dict(self):
        """decay, warmup, num_updates, the averages (host copies) and, over a ParamSet, its
        layout as ``"paramset"`` (:func:`paramset_layout`). Inside ``swapped()`` the averages
        are read where they are then (the parameters, for those of the averages' dtype)."""
        held = [
            p if self._swapped and a.dtype == p.dtype else a
            for a, p in zip(self._averages, self._params)
        ]
        state = {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "averages": [
                b.to_numpy(a, self._launch_stream(p))
                for b, a, p in zip(self._backends, held, self._params)
            ],
        }
        if self._layout is not None:
            state["paramset"] = self.paramset_layout
        return state

    def load_state_dict(self, state):
        """Load a :meth:`state_dict`, everything checked before the first write
        (:meth:`check_state_dict`); RuntimeError inside ``swapped()``, before any check."""
        self._refuse_while_swapped("load_state_dict()")
        converted, num = self.check_state_dict(state)
        for b, host, mine, p in zip(self._backends, converted, self._averages, self._params):
            b.assign(mine, host, self._launch_stream(p))  # uploaded on the EMA's stream
        self.decay, self.warmup, self.num_updates = float(state["decay"]), state["warmup"], int(num)

    def check_state_dict(self, state):
        """ValueError/TypeError unless :meth:`load_state_dict` takes ``state``; changes nothing.
        A state taken over a ParamSet is refused by an EMA over a ParamSet of another layout
        (naming the difference): the averages are one flat array, so a reordered ParamSet would
        get each parameter's average from another one's place. Returns (the averages converted
        to this EMA's dtypes on the host, num_updates)."""
        saved = state.get("paramset")
        if saved is not None and self._layout is not None:
            problem = layout_mismatch(saved, self._layout)
            if problem is not None:
                raise ValueError(f"EMA state is of another ParamSet: {problem}")
        averages = state["averages"]
        if len(averages) != len(self._averages):
            raise ValueError(
                f"EMA state has {len(averages)} arrays, this EMA {len(self._averages)}"
            )
        converted = []  # every array checked and converted before the first is written
        for i, (a, mine) in enumerate(zip(averages, self._averages)):
            if int(np.prod(np.shape(a))) != mine.size:
                raise ValueError(
                    f"EMA state array {i} has shape {np.shape(a)}, expected {mine.shape}"
                )
            host = np.asarray(a.get() if hasattr(a, "get") else a)
            if not (np.issubdtype(host.dtype, np.floating) or is_16bit(host.dtype)):
                raise TypeError(
                    f"EMA state array {i} has dtype {host.dtype}; averages are real floats"
                )
            converted.append(host.reshape(-1).astype(mine.dtype))
        num = state["num_updates"]
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
            raise ValueError(f"EMA num_updates must be an int >= 0, got {num!r}")
        check_interval("decay", state["decay"], 0.0, 1.0, hi_closed=True)
        check_bool("warmup", state["warmup"])
        return converted, num


def _shapes_of(params):
    if hasattr(params, "shape"):
        return [params.shape]
    values = params.values() if isinstance(params, dict) else params
    return [a.shape for a in values]


def _average_dtype(dtype):
    """float32 for 16-bit parameters (see :class:`EMA`), else the parameter's dtype."""
    return np.dtype(np.float32) if is_16bit(dtype) else np.dtype(dtype)


def _storage_of(dtype):
    """The storage of the averaging kernel: the average (the rule's parameter) in
    :func:`_average_dtype`, the parameter (its input) as stored."""
    avg = arrays.storage_name(_average_dtype(dtype))
    return Storage(avg, arrays.storage_name(dtype), avg, False, False)
