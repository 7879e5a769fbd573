"""The hyperparameter tables: constructors built from them keep torch's signatures, positional
calls, defaults and checks; hand-written constructors (the older way) keep working."""

import inspect

import numpy as np
import pytest

import fastopt as fo
from fastopt.optim import OPTIMIZERS, Optimizer
from fastopt.optim.base import constructor_defaults
from fastopt.optim.hyperparameters import MAXIMIZE, adam_family, flag, lr, revise


def _w():
    return np.ones(4, np.float32)


def test_adam_signature_is_torchs():
    assert str(inspect.signature(fo.Adam)) == (
        "(params, lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False, *, "
        "maximize=False, decoupled_weight_decay=False, **options)"
    )
    assert str(inspect.signature(fo.AdamW)) == (
        "(params, lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, amsgrad=False, *, "
        "maximize=False, **options)"
    )


def test_positional_and_keyword_arguments_bind_as_a_written_constructor():
    opt = fo.Adam([_w()], 1e-2, (0.8, 0.9), 1e-6, 0.1, True, maximize=True)
    assert opt.defaults == {
        "lr": 1e-2,
        "betas": (0.8, 0.9),
        "eps": 1e-6,
        "weight_decay": 0.1,
        "amsgrad": True,
        "maximize": True,
        "decoupled_weight_decay": False,
    }
    with pytest.raises(TypeError, match="multiple values for argument 'lr'"):
        fo.Adam([_w()], 1e-2, lr=1e-3)
    with pytest.raises(TypeError, match="too many positional arguments"):
        fo.Adam([_w()], 1e-2, (0.9, 0.99), 1e-8, 0.0, False, True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nesterov'"):
        fo.Adam([_w()], nesterov=True)


def test_every_table_class_builds_defaults_in_signature_order():
    """Every registered optimizer declares a table, except L-BFGS (a closure optimizer whose
    max_eval default depends on max_iter, as torch's): its constructor is its own."""
    for cls in OPTIMIZERS.values():
        table = cls.hyperparameter_table
        if cls.requires_closure:
            assert table is None and "__init__" in cls.__dict__, cls
            continue
        assert table, cls
        opt = cls([_w().reshape(2, 2)])  # a matrix: every class takes one (Muon nothing else)
        assert list(opt.defaults) == [row.name for row in table]
        sig = inspect.signature(cls).parameters
        for row in table:
            if row.fixed:
                assert row.name not in sig
            else:
                assert sig[row.name].default == row.default
                assert (sig[row.name].kind is inspect.Parameter.KEYWORD_ONLY) == row.keyword_only


def test_adamw_fixes_decoupled_weight_decay_and_checks_it_in_groups():
    opt = fo.AdamW([_w()])
    assert opt.defaults["decoupled_weight_decay"] is True
    with pytest.raises(TypeError, match="decoupled_weight_decay must be a bool"):
        fo.AdamW([{"params": [_w()], "decoupled_weight_decay": 1}])
    with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
        fo.AdamW([_w()], decoupled_weight_decay=False)


def test_revise_changes_defaults_and_refuses_unknown_names():
    table = revise(adam_family(), lr=5e-3, fixed={"weight_decay": 0.5})
    assert [(r.name, r.default, r.fixed) for r in table][::3] == [
        ("lr", 5e-3, False),
        ("weight_decay", 0.5, True),
    ]
    with pytest.raises(KeyError, match="momentum"):
        revise(adam_family(), momentum=0.9)


def test_keyword_only_row_before_a_positional_one_fails_at_class_creation():
    with pytest.raises(ValueError):

        class Bad(Optimizer):
            hyperparameter_table = (MAXIMIZE, lr(1e-3))


def test_subclass_hook_checks_across_fields():
    with pytest.raises(ValueError, match="nesterov=True requires momentum"):
        fo.SGD([_w()], lr=0.1, nesterov=True)


class _HandWritten(Optimizer):
    """A class written the older way: its own __init__ and _check."""

    algorithm = "sgd"

    def __init__(self, params, lr=0.5, weight_decay=0.0, *, maximize=False, **options):
        super().__init__(params, constructor_defaults(locals()), **options)

    def _check(self, group):
        if group["lr"] > 1:
            raise ValueError("lr above 1")

    def _rule(self, group):
        return "sgd"

    def _state_names(self, group):
        return ()

    def _scalars(self, group, state, step, lr):
        return {"lr": lr, "weight_decay": 0.0, "gsign": 1.0}, None

    def hyperparameters(self, group, lr):  # the reference sgd's arguments
        return dict(super().hyperparameters(group, lr), momentum=0.0, dampening=0.0, nesterov=False)


def test_hand_written_constructors_still_work():
    w = _w()
    opt = _HandWritten([w], backend="numpy")
    assert opt.defaults == {"lr": 0.5, "weight_decay": 0.0, "maximize": False}
    assert str(inspect.signature(_HandWritten)) == (
        "(params, lr=0.5, weight_decay=0.0, *, maximize=False, **options)"
    )
    opt.step([np.ones(4, np.float32)])
    np.testing.assert_allclose(w, 0.5)
    with pytest.raises(ValueError, match="lr above 1"):
        _HandWritten([_w()], lr=2.0)


def test_a_table_subclass_of_a_table_class_calls_the_written_base_init():
    class Flagged(fo.Adam):
        hyperparameter_table = (*fo.Adam.hyperparameter_table, flag("extra", keyword_only=True))

    opt = Flagged([_w()], 1e-2, extra=True)
    assert opt.defaults["extra"] is True and opt.defaults["lr"] == 1e-2
    with pytest.raises(TypeError, match="extra must be a bool"):
        Flagged([_w()], extra=1)
