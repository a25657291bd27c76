"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column, updating the
not-yet-quantized columns to compensate each column's rounding error through the inverse Hessian
of the layer's reconstruction loss ``‖X Wᵀ − X Ŵᵀ‖²`` (``H = 2 XᵀX / n``).

Options: ``damp`` (fraction of the mean diagonal added to H), ``act_order`` (quantize columns in
order of decreasing ``H_jj``; group parameters are then computed up front from the original
weights, so every group keeps contiguous columns and the kernels need no permutation),
``block`` (columns updated lazily per block, the usual speed trick).
Without act_order, a group's scale is computed when the group's first column is reached, from
the already error-updated weights, as in the reference implementation.

The output has the layout of :func:`qcompile.quant.quantizer.quantize_weight_groups`: codes ``[N, K]``,
scales ``[N, G]``, offsets ``[N, G]`` or None; with H = identity it equals RTN exactly.
With ``grid`` (fixed scales and offsets) only the codes are computed: decoupleQ's sequential-rounding
step. A Hessian that is singular even after damping (rank-deficient inputs, ``damp`` 0) is a
:class:`~qcompile.errors.PlanError` saying to raise ``damp``, never a raw LinAlgError.
A weight or Hessian holding NaN/±Inf (NaN calibration activations accumulate into H), an inverse
Hessian factor that is not finite, or a group scale that overflows is a
:class:`~qcompile.errors.NonFiniteError`, never codes computed from NaN.
"""

from __future__ import annotations

import torch

from qcompile.errors import PlanError
from qcompile.quant.finite import check_finite
from qcompile.quant.quantizer import code_dtype, num_groups, params_from_range
from qcompile.quant.spec import levels


class Hessian:
    """Running ``H = 2/n Σ xᵀx`` over calibration rows of one linear's input (float64 sums)."""

    def __init__(self, k: int) -> None:
        self.sum = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += x2.t() @ x2
        self.n += x2.shape[0]

    update = add  # the observer interface

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration rows were observed")
        return (2.0 / self.n) * self.sum


def damped_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's damped Hessian in float64 and its dead columns: a zero diagonal entry (an input channel
    that was always 0) becomes 1, then ``damp`` times the mean diagonal is added to the diagonal."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=torch.float64)
    return h, dead


def cholesky(h: torch.Tensor, damp: float, what: str = "gptq") -> torch.Tensor:
    """The lower Cholesky factor of the damped Hessian ``h``; a PlanError when ``h`` is not positive
    definite even after damping (rank-deficient calibration inputs with ``damp`` 0 or too small)."""
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise PlanError(
            f"the Hessian of the layer's calibration inputs is singular even after damping (damp {damp}; "
            f"{what}: Cholesky failed at column {int(info) - 1} of {h.shape[0]}); raise the quantize_weights "
            "option damp (e.g. 0.01) or calibrate on more varied data"
        )
    return factor


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-quantize ``weight[N, K]`` with Hessian ``[K, K]`` in groups of ``group_size`` input channels
    (K: one group per row) → (codes int8, scale [N, G], offset or None).

    ``grid``: fixed group parameters ``(scale [N, G], offset [N, G] or None)``: only the codes are
    computed (sequential rounding with error feedback on that grid; decoupleQ's integer step), the
    returned scale and offset are the given ones. A Hessian that is singular even after damping is a
    PlanError saying to raise ``damp``."""
    check_finite(weight, f"the weight {list(weight.shape)} being quantized (gptq)")
    check_finite(hessian, "the Hessian of the layer's calibration inputs (gptq)", "check the calibration data")
    n, k = weight.shape
    gs = group_size
    g = num_groups(k, gs)
    qmin, qmax = levels(bits, symmetric)
    w = weight.detach().to(torch.float64).clone()
    h, dead = damped_hessian(hessian, damp)
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = cholesky(torch.cholesky_inverse(cholesky(h, damp)), damp, "inverse Hessian").t()
    check_finite(hinv, "the inverse Hessian's Cholesky factor (gptq)", "raise the option damp")

    scale = torch.ones(n, g, dtype=torch.float64)
    offset = torch.zeros(n, g, dtype=torch.float64) if not symmetric else None
    if grid is not None:
        scale = grid[0].to(torch.float64).clone()
        if offset is not None:
            if grid[1] is None:
                raise ValueError("an asymmetric fixed grid needs an offset")
            offset = grid[1].to(torch.float64).clone()

    def set_group(gi: int, cols: torch.Tensor) -> None:
        s, m = params_from_range(cols.amin(dim=1), cols.amax(dim=1), bits, symmetric)
        scale[:, gi] = s
        if offset is not None and m is not None:
            offset[:, gi] = m

    if act_order and grid is None:  # static groups from the original weights, in original column order
        orig = weight.detach().to(torch.float64)
        for gi in range(g):
            set_group(gi, orig[:, gi * gs : (gi + 1) * gs])
    codes = torch.zeros(n, k, dtype=torch.float64)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = b0 + j
            orig_col = int(perm[col])
            gi = orig_col // gs
            if not act_order and grid is None and orig_col % gs == 0:
                set_group(gi, torch.cat([wb[:, j:], w[:, b1:]], dim=1)[:, :gs])
            s = scale[:, gi]
            m = offset[:, gi] if offset is not None else 0.0
            q = torch.clamp(torch.round((wb[:, j] - m) / s), qmin, qmax)
            codes[:, col] = q
            e = (wb[:, j] - (q * s + m)) / hinv[col, col]
            wb[:, j:] -= e[:, None] * hinv[col, b0 + j : b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    return (
        codes.to(code_dtype(bits, symmetric)),
        scale.to(torch.float32),
        None if offset is None else offset.to(torch.float32),
    )
