"""``fastopt.distributed.agreement`` in one process: the descriptions the ranks compare and the
errors they raise, with a communicator whose ``allgather`` returns what the other ranks would
send. ``tests/test_distributed.py`` runs the same over MPI (``mpi_scripts/agreement.py``)."""

import math

import numpy as np
import pytest

import fastopt as fo
from fastopt.distributed import agreement as A


class OtherRanks:
    """A communicator of rank 0 whose allgather returns this rank's object, then ``others``
    (each a function of this rank's object, returning what that rank sends)."""

    def __init__(self, *others):
        self.others = others

    def allgather(self, obj):
        return [obj] + [other(obj) for other in self.others]


def same(obj):
    return obj


def test_descriptions_are_equal_exactly_for_the_same_argument():
    d = A.describe
    assert d(math.nan) == d(float("nan")) == "nan"
    assert d(np.float32(0.5)) == d(0.5) and d(np.int64(3)) == d(3)
    assert d((0.9, 0.999)) != d([0.9, 0.999])  # a tuple and a list are other arguments
    assert d({"b": 1, "a": 2}) == d({"a": 2, "b": 1})
    assert d(np.dtype("float32")) == ("dtype", "float32")
    ps = fo.ParamSet({"w": np.zeros((2, 3)), "b": np.ones(3)})
    other_values = fo.ParamSet({"w": np.ones((2, 3)), "b": np.zeros(3)})
    assert d(ps) == d(other_values)  # the layout, not the values (they are broadcast)
    assert d(ps) != d(fo.ParamSet({"w": np.zeros((3, 2)), "b": np.ones(3)}))
    assert d(ps) != d(fo.ParamSet({"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}))
    assert d(np.arange(3.0)) == d(np.arange(3.0)) != d(np.arange(1.0, 4.0))
    assert d(lambda step: 0.1) == d(lambda step: 0.2)  # both "<lambda>" of this function
    masks = [{"w": True}.get, {"w": True}.get]  # bound methods: named, not by their address
    assert d(masks[0]) == d(masks[1]) == ("function", "None.dict.get")

    class Shown:
        def __repr__(self):
            return f"<Shown at {hex(id(self))}>"

    assert d(Shown()) == d(Shown())

    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")

    assert d(Broken())[0] == "undescribable"  # described anyway: every rank must compare


def test_the_first_different_argument_is_named_with_each_ranks_part():
    def other_lr(described):
        return [(n, A.describe({"lr": 0.2, "betas": (0.9, 0.99)}) if n == "options" else v)
                for n, v in described]  # fmt: skip

    arguments = {"root": 0, "options": {"lr": 0.1, "betas": (0.9, 0.99)}}
    A.agree_on_arguments(OtherRanks(same, same), "X", arguments)  # the same: nothing raised
    with pytest.raises(ValueError) as err:
        A.agree_on_arguments(OtherRanks(same, other_lr), "X", arguments)
    message = str(err.value)
    assert message.startswith("X: the ranks passed different options['lr'] ")
    assert "(rank 0: 0.1; rank 1: 0.1; rank 2: 0.2)" in message


def test_a_nested_difference_is_followed_into_lists_and_tuples():
    a = A.describe({"groups": [{"betas": (0.9, 0.999)}]})
    b = A.describe({"groups": [{"betas": (0.9, 0.99)}]})
    assert A._difference_path(a, b) == ["groups", 0, "betas", 1]
    assert A._at(a, ["groups", 0, "betas", 1]) == 0.999
    c = A.describe({"groups": [{"betas": (0.9, 0.999)}, {"lr": 1.0}]})
    assert A._difference_path(a, c) == ["groups"]  # other lengths: the list as a whole


def test_a_refusal_on_another_rank_raises_here_and_its_own_there():
    def refused(obj):
        return ("ValueError: gradient must be a flat array", None)

    with pytest.raises(ValueError, match=r"Y: refused on rank 1 \(ValueError: gradient"):
        A.agree_on_outcome(OtherRanks(refused), "Y", lambda: 1.0)
    with pytest.raises(KeyError, match="mine"):
        A.agree_on_outcome(OtherRanks(same), "Y", lambda: {}["mine"])
    got = A.agree_on_outcome(OtherRanks(same), "Y", lambda: 2.0, lambda r: {"grad_scale": r})
    assert got == 2.0

    def other_scale(obj):
        return (None, [("grad_scale", 4.0)])

    with pytest.raises(ValueError, match=r"different grad_scale \(rank 0: 2.0; rank 1: 4.0\)"):
        A.agree_on_outcome(OtherRanks(other_scale), "Y", lambda: 2.0, lambda r: {"grad_scale": r})


def test_optimizer_arguments_leave_out_what_each_rank_owns():
    ps = fo.ParamSet({"w": np.zeros((4, 4)), "b": np.zeros(4)})
    opt = fo.Muon(ps, lr=0.02, muon_params="hidden", max_grad_norm=1.0)
    args = A.optimizer_arguments(opt)
    assert args["class"] is fo.Muon and args["max_grad_norm"] == 1.0
    assert all("params" not in g and "muon_params" not in g for g in args["param_groups"])
    assert args["param_groups"][0]["lr"] == 0.02
    assert A.optimizer_arguments(None) is None


def test_values_python_finds_equal_but_the_checks_tell_apart_differ():
    for mine, other in ((True, 1), (3.0, 3), (False, 0), ((1, 2), (1.0, 2))):
        with pytest.raises(ValueError, match="the ranks passed different x"):
            A.agree_on_arguments(OtherRanks(lambda obj, o=other: [("x", A.describe(o))]), "Y",
                                 {"x": mine})  # fmt: skip
    A.agree_on_arguments(OtherRanks(same), "Y", {"x": np.int64(3), "y": np.float32(0.5)})
