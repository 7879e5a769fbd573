"""The Trainer's param groups with weight decay keep the model's tensors apart for rules whose
statistics are per tensor (LAMB, LARS, NovoGrad: a norm per tensor; Adafactor: factored
moments of each matrix). One flat view of all weights would be one tensor to them: LAMB's
trust ratio over every weight matrix at once, Adafactor unfactored."""

import numpy as np
import pytest

import fastopt as fo
from fastopt.nn import MLP

PER_TENSOR = [fo.LAMB, fo.LARS, fo.NovoGrad, fo.Adafactor]


def _model():
    return MLP(8, (16, 12), 3, seed=0, dtype="float64")


@pytest.mark.parametrize("cls", PER_TENSOR, ids=lambda c: c.__name__)
def test_trainer_step_equals_the_optimizer_over_each_tensor(cls):
    model = _model()
    trainer = fo.Trainer(model, cls, lr=0.01, weight_decay=0.01)
    reference = _model()
    names = reference.params.names
    weights = {n: reference.params[n].copy() for n in names if reference.params[n].ndim == 2}
    rest = {n: reference.params[n].copy() for n in names if n not in weights}
    assert weights and rest
    opt = cls(
        [{"params": weights, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=0.01,
    )
    rng = np.random.default_rng(1)
    for _ in range(3):
        g = rng.standard_normal(model.params.size)
        model.params.grad_flat[...] = g
        trainer.optimizer.step(trainer._grads)
        grads = {
            n: g[slice(*model.params.offsets[n])].reshape(model.params.shapes[n]) for n in names
        }
        opt.step([{n: grads[n] for n in weights}, {n: grads[n] for n in rest}])
    for n in names:
        want = weights[n] if n in weights else rest[n]
        assert model.params[n].tobytes() == want.tobytes(), n


def test_adafactor_keeps_factored_moments_under_the_trainers_weight_decay():
    trainer = fo.Trainer(_model(), fo.Adafactor, lr=0.01, weight_decay=0.01)
    trainer.optimizer.step(trainer._grads)
    state = trainer.optimizer.state_dict()["state"]
    shapes = [tuple(np.shape(s["row_var"])) + tuple(np.shape(s["col_var"])) for s in state.values()]
    assert (8, 1, 1, 16) in shapes  # the first layer's 8 x 16 weight: 8 + 16 values


def test_elementwise_rules_keep_one_view_per_group():
    """Adam under the Trainer's weight decay still steps one flat view per group."""
    trainer = fo.Trainer(_model(), fo.AdamW, lr=0.01, weight_decay=0.01)
    groups = trainer.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert all(g["params"][0].ndim == 1 for g in groups)
