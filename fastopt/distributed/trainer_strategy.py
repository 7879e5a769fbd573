"""What :class:`fastopt.trainer.Trainer` does over MPI (``distributed=True``): the data-parallel
strategy behind its seam (``epoch_indices``, ``reduce_gradients``, ``reduce_sums``).

Every rank builds the same model and trainer and calls ``fit`` with the whole dataset. Global batch
``k`` is positions ``[k*B, (k+1)*B)`` of the one-process epoch order and rank ``r`` takes the
positions ``p`` with ``p % world == r``; each rank's mean gradient is weighted by its share of the
global batch, so N ranks train as one process with batch ``B``. Gradients are summed by
:class:`~fastopt.distributed.DataParallel` (one Allreduce, the 1/world in the step's
``grad_scale``) or inside :class:`~fastopt.distributed.ZeroRedundancyOptimizer`'s step. Metric
sums, stop requests and the epoch time are agreed with small Allreduces; checkpoints are written
and read by the root alone (the Trainer's docstring has the whole contract).
"""

import numpy as np

from .. import checkpoint
from ..arrays import array_module
from ..optim import Optimizer
from ..trainer import resume
from ..trainer.strategy import LocalStrategy
from .checkpoints import StateHolder
from .collectives import Collectives, raise_everywhere
from .data_parallel import DataParallel

STOP_CHECK_EVERY = 16
"""Ctrl-C: the ranks agree on a stop request every this many steps (one int Allreduce)."""


def _count(x, r, w):
    """How many of the positions ``0 .. x-1`` are ``r`` modulo ``w``."""
    return max(0, (x - r + w - 1) // w)


class MPIStrategy(LocalStrategy):
    """Data parallelism over the communicator of ``context`` (ZeRO-1 with ``zero``)."""

    collective = True

    def __init__(self, context, zero):
        self.context = context
        self.zero = zero
        self.comm, self.root = context.comm, context.root
        self.rank, self.world_size = context.rank, context.world_size
        self.is_root = context.is_root
        self.reducer = None  # the DataParallel / ZeroRedundancyOptimizer doing the collectives
        self._coll = None
        self._batch_weight = 1.0

    @property
    def stats(self):
        return None if self.reducer is None else self.reducer.stats

    def _small(self):
        """Collectives for the small agreements (metric sums, flags, broadcasts)."""
        if self._coll is None:
            self._coll = Collectives(self.comm, None)
        return self._coll

    # ---- construction
    def check_batch_size(self, batch_size, batch_norm):
        need = 2 * self.world_size if batch_norm else self.world_size
        if batch_size < need:
            raise ValueError(
                f"batch_size is the global batch; with {self.world_size} ranks"
                f"{' and batch norm' if batch_norm else ''} it must be >= {need}, "
                f"got {batch_size}"
            )

    def agree_seed(self, seed):
        return int(self.comm.bcast(seed, root=self.root))

    def build_zero(self, model, optimizer, lr, weight_decay, optimizer_kwargs, clip, params=None):
        """The ZeroRedundancyOptimizer over ``params`` (default ``model.params``; the 16-bit
        copy of a ``precision="bf16"`` Trainer) for an optimizer class or an unstepped instance
        over ``model.params`` (whose class and settings are used)."""
        params = model.params if params is None else params
        if weight_decay:
            raise ValueError(
                "zero=True does not support weight_decay (the weights-only L2 needs two param "
                "groups); use zero=False, or the optimizer's own weight_decay in optimizer_kwargs"
            )
        max_norm, max_value = clip["max_grad_norm"], clip["max_grad_value"]
        skip = clip["skip_nonfinite"]
        overrides, backend = {}, None
        if isinstance(optimizer, type):
            if not issubclass(optimizer, Optimizer):
                raise TypeError(f"optimizer class {optimizer.__name__} is not a fastopt optimizer")
            cls, kwargs = optimizer, {"lr": lr, **dict(optimizer_kwargs or {})}
            if getattr(cls, "matrices_only", False):  # Muon: the Trainer's recipe, one ParamSet
                kwargs.setdefault("muon_params", "hidden")
        elif isinstance(optimizer, Optimizer):
            if optimizer_kwargs:
                raise ValueError("optimizer_kwargs apply only when optimizer is a class")
            sources = optimizer.sources()
            if len(sources) != 1 or sources[0] is not model.params:
                raise ValueError(
                    "zero=True: an optimizer instance must be built over model.params (one "
                    "param group); or pass its class"
                )
            if optimizer.state:
                raise ValueError("zero=True: the optimizer instance has already stepped")
            # the storage options (state_dtype, master weights, ...) are not in defaults
            cls = type(optimizer)
            options = ("state_dtype", "master_weights", "stochastic_rounding", "seed")
            kwargs = {
                **dict(optimizer.defaults),
                **{k: getattr(optimizer.precision, k) for k in options},
            }
            overrides = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            if "muon_params" in overrides:  # over the whole model: ZeRO restricts it per rank
                kwargs["muon_params"] = overrides.pop("muon_params")
            backend = optimizer.backend_name
            max_norm = optimizer.max_grad_norm if max_norm is None else max_norm
            max_value = optimizer.max_grad_value if max_value is None else max_value
            skip = optimizer.skip_nonfinite if skip is None else skip
        else:
            raise TypeError(
                f"optimizer must be a fastopt optimizer class or instance, got {optimizer!r}"
            )
        zero = self.context.zero(
            params, cls, max_grad_norm=max_norm, max_grad_value=max_value,
            skip_nonfinite=bool(skip), backend=backend, **kwargs,
        )  # fmt: skip
        zero.param_groups[0].update(overrides)
        self.reducer = zero
        return zero

    def attach(self, model, optimizer):
        if self.zero:
            return None  # ZeRO reduces inside its step
        # no optimizer: the Trainer steps its own (any param groups) with grad_scale
        self.reducer = DataParallel(model.params, None, comm=self.comm, root=self.root)
        return 1.0 / self.world_size

    # ---- the seam
    def share(self, order):
        if self.world_size > 1:
            order = order[self.rank :: self.world_size].copy()
        return order

    def set_batch_rows(self, lo, hi, m):
        # this rank's share of the global batch's mean gradient
        w = self.world_size
        self._batch_weight = 1.0 if (hi - lo) * w == m else (hi - lo) * w / m

    def reduce_gradients(self, model):
        if self.reducer is None:
            return
        w = self._batch_weight
        if w != 1.0:
            g = model.params.grad_flat
            if w == 0.0:
                g.fill(0)
            else:
                g *= g.dtype.type(w)
        if not self.zero:
            self.reducer.allreduce_grads(average=False)

    def reduce_sums(self, sums):
        return [float(v) for v in self._small().allreduce_scalars(sums, "Allreduce(metrics)")]

    def any_rank(self, flag):
        return not self._small().all_true(not flag)

    def slowest(self, seconds):
        from mpi4py import MPI

        return float(self.comm.allreduce(float(seconds), op=MPI.MAX))

    # ---- epochs
    def epoch_size(self, trainer, n_train, has_val):
        sizes = self.comm.allgather((int(n_train), has_val))
        if len(set(sizes)) != 1:
            raise ValueError(
                "distributed fit: every rank must pass the same data (training samples, "
                f"validation) per rank: {sizes}"
            )
        self._broadcast_model(trainer.model)
        return n_train  # global batches are cut from the whole epoch order

    def cut_size(self, order, n_train):
        return n_train

    def skips_last_batch(self, n_epoch, steps, batch_size):
        # a last global batch giving some rank < 2 rows is skipped everywhere
        return n_epoch - (steps - 1) * batch_size < 2 * self.world_size

    def batch_bounds(self, s, n, batch_size):
        glo = s * batch_size
        ghi = min(glo + batch_size, n)
        w, r = self.world_size, self.rank
        if w == 1:
            return glo, ghi, ghi - glo
        return _count(glo, r, w), _count(ghi, r, w), ghi - glo

    def stop_now(self, s, steps, requested):
        # the ranks agree every STOP_CHECK_EVERY steps; the last step's request is acted on
        # after the epoch is recorded (stop_after_epoch)
        if s >= steps - 1:
            return False
        return (s + 1) % STOP_CHECK_EVERY == 0 and self.any_rank(requested)

    def stop_after_epoch(self, requested):
        return self.any_rank(requested)

    def end_of_epoch(self, model):
        if model.batch_norm:
            self._average_bn_buffers(model)

    def evaluate(self, trainer, X, y, rows):
        """Each rank evaluates every world-th row, the sums are added over the ranks."""
        model = trainer.model
        xp = array_module(model.device)[0]
        n = X.shape[0] if rows is None else len(rows)
        mine = np.arange(self.rank, n, self.world_size, dtype=np.int64)
        if rows is not None:
            mine = np.asarray(rows, dtype=np.int64)[mine]
        if xp is not np:
            mine = xp.asarray(mine)
        sums = [0.0, 0.0, 0.0]
        bs = trainer.eval_batch_size
        for lo in range(0, len(mine), bs):
            for i, v in enumerate(model.batch_loss(X, y, mine[lo : lo + bs])):
                sums[i] += v
        total = trainer.reduce_sums([*sums, float(len(mine))])
        return model.metrics_from_sums(total[:3], max(total[3], 1.0))

    def run_meta(self):
        return {"world_size": self.world_size, "zero": self.zero}

    def _broadcast_model(self, model):
        """Every parameter and buffer from the root."""
        coll = self._small()
        coll.bcast(model.params.flat, self.root)
        for a in model.buffers.values():
            coll.bcast(a.reshape(-1), self.root)

    def _average_bn_buffers(self, model):
        names = [k for k in model.buffers if ".bn.running_" in k]
        if not names or self.world_size == 1:
            return
        xp = array_module(model.device)[0]
        bufs = [model.buffers[k] for k in names]
        flat = xp.concatenate([b.reshape(-1) for b in bufs])
        self._small().allreduce_sum(flat, "Allreduce(batch norm)")
        flat *= flat.dtype.type(1.0 / self.world_size)
        lo = 0
        for b in bufs:
            b[...] = flat[lo : lo + b.size].reshape(b.shape)
            lo += b.size

    # ---- checkpoints
    def save_checkpoint(self, trainer, path):
        """Collective: rank 0 writes the one file (a ZeRO state gathered first, every rank's
        dropout generator beside it); every rank returns ``path`` or raises."""
        state, extra = resume.trainer_state(trainer)
        optimizer = trainer.optimizer
        if self.zero:
            optimizer = StateHolder(
                optimizer.state_dict(root=self.root), [optimizer.params]
            )  # gathered
        rng_states = self.comm.gather(trainer.rng.bit_generator.state, root=self.root)
        exc = None
        if self.is_root:
            state["world_size"] = self.world_size
            state["zero"] = self.zero
            extra["rng_states"] = rng_states
            try:
                checkpoint.save(
                    path,
                    params=trainer.model.arrays(),
                    optimizer=optimizer,
                    plateau=trainer.plateau,
                    rng=trainer.rng,
                    extra=extra,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        raise_everywhere(self.comm, self.root, exc)
        return path

    def load_checkpoint(self, trainer, path, plateau_factory):
        """Collective resume: only the root reads ``path``; the others receive what they need.
        Returns (trainer state, best weights, saved per-rank RNG states or None)."""
        comm, root = self.comm, self.root
        ckpt, exc, has_plateau = None, None, None
        if self.is_root:
            try:
                ckpt = checkpoint.load(path)
                resume.check_trainer_checkpoint(ckpt, path, trainer.model)
                if self.zero:  # check the optimizer state before anything changes
                    self._check_zero_state(ckpt, trainer.optimizer)
                has_plateau = ckpt.plateau_state is not None
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        raise_everywhere(comm, root, exc)
        has_plateau = comm.bcast(has_plateau, root=root)
        if has_plateau and trainer.plateau is None:
            trainer.plateau = plateau_factory()
        plateau = trainer.plateau if has_plateau else None
        if self.is_root:
            try:
                ckpt.restore(
                    params=trainer.model.arrays(),
                    optimizer=None if self.zero else trainer.optimizer,
                    plateau=plateau,
                    rng=trainer.rng,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                exc = e
        raise_everywhere(comm, root, exc)
        # parameters and buffers: fit broadcasts them from the root
        optimizer = trainer.optimizer
        if self.zero:
            optimizer.load_state_dict(ckpt.optimizer_state if self.is_root else None, root=root)
        else:
            sd = comm.bcast(optimizer.state_dict() if self.is_root else None, root=root)
            if not self.is_root:
                optimizer.load_state_dict(sd)
        if plateau is not None:
            sd = comm.bcast(plateau.state_dict() if self.is_root else None, root=root)
            if not self.is_root:
                plateau.load_state_dict(sd)
        extra = comm.bcast(ckpt.extra if self.is_root else None, root=root)
        return extra["trainer"], extra.get("best_state"), extra.get("rng_states")

    @staticmethod
    def _check_zero_state(ckpt, zero):
        if ckpt.optimizer_state is None:
            raise ckpt.error("it holds no optimizer state")
        want = zero.optimizer_class.__name__
        got = ckpt.optimizer_state.get("algorithm")
        if got != want:
            raise ckpt.error(f"it holds {got} optimizer state, the optimizer is {want}")
        zero.check_state_dict(ckpt.optimizer_state)

    def restore_rng(self, trainer, rng_states):
        # this rank's dropout generator: its own when the world size is the same; rank 0's is
        # the checkpoint's rng; other ranks of another world size start a fresh stream
        if rng_states is not None and len(rng_states) == self.world_size:
            trainer.rng.bit_generator.state = rng_states[self.rank]
        elif self.rank:
            trainer.rng = trainer.dropout_rng(trainer.epoch)
