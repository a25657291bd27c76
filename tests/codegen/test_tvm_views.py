"""The Relax rewrite of data moves into views (qcompile/codegen/tvm/views.py): which permutes become
reshapes, same-dtype casts and reshape chains, and that a rewritten module computes the same values."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def _dims(*ds: int | str) -> list:
    import tvm

    return [tvm.tirx.IntImm("int64", d) if isinstance(d, int) else tvm.tirx.Var(d, "int64") for d in ds]


@pytest.mark.parametrize(
    ("shape", "axes", "want"),
    [
        ((1, 1, 9, 64), [0, 2, 1, 3], (1, 9, 1, 64)),  # V before the cache write, one token
        ((1, 9, 1, 64), [0, 2, 1, 3], (1, 1, 9, 64)),  # the attention output before o_proj
        ((1, "s", 9, 64), [0, 2, 1, 3], None),  # prefill: a real transpose (s symbolic)
        ((1, 2, 9, 64), [0, 2, 1, 3], None),
        ((1, 9, 64), [0, 1, 2], None),  # the identity: nothing to do
        ((4, 1), None, (1, 4)),  # reversed axes
        ((2, 1, 3), [2, 1, 0], None),
    ],
)
def test_only_permutes_that_move_unit_dims_are_reshapes(shape, axes, want):
    from qcompile.codegen.tvm.views import unit_permute_shape

    out = unit_permute_shape(_dims(*shape), axes)
    assert (None if out is None else tuple(int(d) for d in out)) == want


def _module():
    """``f(x[1, 1, 4, 8], y[2, 3])``: a one-token transpose, a real transpose, a same-dtype cast and a
    reshape chain, each feeding an add so that values can be compared."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 1, 4, 8], "float32"))
    y = relax.Var("y", relax.TensorType([2, 3], "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))  # [1, 4, 1, 8]: a view
            back = bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3]))
            c = bb.emit(relax.op.astype(back, "float32"))
            r1 = bb.emit(relax.op.reshape(c, [1, 32]))
            r2 = bb.emit(relax.op.reshape(r1, [4, 8]))
            a = bb.emit(relax.op.add(r2, relax.const(1.0, "float32")))
            yt = bb.emit(relax.op.permute_dims(y, [1, 0]))  # a real transpose: kept
            out = bb.emit_output(relax.Tuple([a, bb.emit(relax.op.add(yt, relax.const(2.0, "float32")))]))
        bb.emit_func_output(out)
    return bb.get()


def test_the_rewrite_leaves_real_moves_and_removes_the_rest():
    from tvm import relax

    from qcompile.codegen.tvm.views import MovesAsViews

    text = relax.transform.DeadCodeElimination()(MovesAsViews()(_module())).script()
    assert text.count("R.permute_dims") == 1  # y's transpose
    assert "R.astype" not in text
    # x's two permutes (the second back to x's own shape), the cast and the chain: one reshape, of
    # x through aliases (``lv = x``: no kernel); what the rewrites read through is dead
    assert text.count("R.reshape") == 1 and "R.shape([4, 8])" in text


def test_a_rewritten_module_computes_the_same_values():
    import tvm
    from tvm import relax

    from qcompile.codegen.tvm.views import MovesAsViews

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1, 1, 4, 8), "float32"), rng.standard_normal((2, 3), "float32")
    outs = []
    for mod in (_module(), MovesAsViews()(_module())):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        res = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y))
        outs.append([r.numpy() for r in res])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outs[1][0], x.reshape(4, 8) + 1)


def test_symbolic_reshape_chains_collapse_and_shape_values_pass_through():
    """Prefill's ``[1, s, 64] -> [s, 64] -> [1, s, 64]`` is ``x`` itself; a reshape to a shape held in a
    variable (no literal dims to compare) is kept, reading through the reshape before it."""
    import tvm
    from tvm import relax

    from qcompile.codegen.tvm.views import MovesAsViews

    s = tvm.tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, s, 64], "float32"))
    shp = relax.Var("shp", relax.ShapeType(ndim=2))
    with bb.function("main", [x, shp]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, [s, 64]))
            back = bb.emit(relax.op.reshape(flat, [1, s, 64]))
            a = bb.emit(relax.op.add(back, relax.const(1.0, "float32")))
            b = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(x, [s, 64])), shp))
            out = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(out)
    text = relax.transform.DeadCodeElimination()(MovesAsViews()(bb.get())).script()
    # the round trip is x (an alias binding, no reshape); the shape-valued reshape reads x directly
    assert text.count("R.reshape") == 1 and "R.reshape(x, shp)" in text
