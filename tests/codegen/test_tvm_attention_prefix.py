"""The prefix attention kernel (bool mask, static cache): each row stops at its last unmasked key and
gives the full kernel's output bit for bit, and torch's attention (float64) within fp32 rounding, on
prefix (decode / causal prefill), scattered and fully masked rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from qcompile.codegen.tvm.kernels.attention import (
    Attention,
    attention_primfunc,
    full_attention_primfunc,
    prefix_attention_primfunc,
)
from qcompile.codegen.tvm.target import host_target

pytestmark = pytest.mark.tvm

# (spec, queries at run time): decode GQA as SmolLM2, dynamic queries (prefill), per-head masks, a cache
# length that is not a multiple of the vector width
CASES = [
    (Attention(1, 9, 3, 64, 64, 1, "bool", 1, 0.125), 1),
    (Attention(1, 4, 2, 48, 16, None, "bool", 1, 0.25), 5),
    (Attention(2, 4, 4, 32, 16, 3, "bool", 4, 0.3), 3),
    (Attention(1, 2, 1, 44, 16, 2, "bool", 1, 0.5), 2),
]


def _build(func: tvm.tirx.PrimFunc):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target().tvm)[
        "main"
    ]


def _run(f, q, k, v, m) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros(q.shape, "float32"))
    f(*(tvm.runtime.tensor(a) for a in (q, k, v, m)), out)
    return out.numpy()


def _masks(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    b, mh, s, length = shape
    prefix = np.zeros(shape, bool)
    for i in range(s):
        prefix[:, :, i, : min(length, 3 + 7 * i)] = True  # a growing filled prefix, as causal rows
    scattered = rng.random(shape) < 0.3
    scattered[..., length - 1] = False  # trailing masked keys the kernel skips
    scattered[..., 0] = True
    empty = prefix.copy()
    empty[..., 0, :] = False  # a fully masked row: NaN, as torch
    return {"prefix": prefix, "scattered": scattered, "empty": empty}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefix_kernel_equals_the_full_kernel_and_torch(case):
    spec, s = CASES[case]
    assert attention_primfunc(spec).script() == prefix_attention_primfunc(spec).script()  # the dispatch
    full, prefix = _build(full_attention_primfunc(spec)), _build(prefix_attention_primfunc(spec))
    rng = np.random.default_rng(case)
    b, h, kv, length, d = spec.batch, spec.heads, spec.kv_heads, spec.keys, spec.dim
    q = rng.standard_normal((b, h, s, d)).astype("float32")
    k = rng.standard_normal((b, kv, length, d)).astype("float32")
    v = rng.standard_normal((b, kv, length, d)).astype("float32")
    for name, m in _masks(rng, (b, spec.mask_heads, s, length)).items():
        got, want = _run(prefix, q, k, v, m), _run(full, q, k, v, m)
        assert np.array_equal(got, want, equal_nan=True), name
        rows_nan = np.isnan(got).any(axis=-1)
        assert rows_nan.any() == (name == "empty")
        g = h // kv
        ref = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q).double(),
            torch.from_numpy(k).double().repeat_interleave(g, dim=1),
            torch.from_numpy(v).double().repeat_interleave(g, dim=1),
            attn_mask=torch.from_numpy(m),
            scale=spec.scale,
        ).numpy()
        ok = ~rows_nan
        if ok.any():  # (a one-query case's empty mask has no unmasked row)
            assert np.abs(got[ok] - ref[ok]).max() < 1e-5 and np.abs(got[ok]).max() > 0.1, name


def test_other_masks_keep_the_full_kernel():
    spec = Attention(1, 4, 2, 32, 16, 1, "float", 1, 0.25)
    assert attention_primfunc(spec).script() == full_attention_primfunc(spec).script()
    with pytest.raises(ValueError, match="bool mask, static keys"):
        prefix_attention_primfunc(spec)
