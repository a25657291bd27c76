"""decoupleQ (Guo et al., 2024, arXiv 2404.12759): a linear layer's weight quantized by alternating
minimization of its output error, with the integer codes and the float grid parameters solved apart.

Per layer it minimizes, summed over the output channels (rows) ``w`` of ``weight[N, K]``,

    L(w) = (w − ŵ)ᵀ H (w − ŵ),   ŵ_j = s_g · u_j + m_g   (j in group g of ``group_size`` columns)

with ``H`` GPTQ's damped Hessian (:func:`qcompile.quant.gptq.damped_hessian`: ``2 XᵀX / n`` plus
``damp`` times its mean diagonal; a column that never saw input is zeroed, as in GPTQ). The codes ``u``
are the unsigned asymmetric grid ``[0, 2^b − 1]`` of :func:`qcompile.quant.quantizer.quantize_weight_groups`;
the paper's signed ``w_int ∈ [−2^(b−1), 2^(b−1) − 1]`` with float zero ``z`` is the same set of weights
(``u = w_int + 2^(b−1)``, ``m = z − 2^(b−1)·s``), so the result drops into the kernels' layout
(codes, scale ``[N, G]``, float offset ``[N, G]``, ``w = u·s + m``).

Iteration 1 (the initialization): min-max round-to-nearest and one GPTQ pass (asymmetric, same ``damp``);
each row keeps the one with the lower ``L``. Every further iteration alternates, for all rows at once:

1. the codes with ``s, m`` fixed (``rounding``): ``gptq`` (default) rounds column by column on the fixed
   grid, feeding each column's error forward through the inverse Hessian (GPTQ's sequential rounding,
   the clamp to the grid being the projection onto the box); ``nearest`` relaxes ``u`` to the box
   ``[0, 2^b − 1]``, takes ``inner_steps`` accelerated projected-gradient steps (FISTA, step ``1/Lip``
   with ``Lip = 2·max_j s_j²·λ_max(H)``) on the quadratic from the current codes, and rounds to nearest;
2. ``s, m`` with the codes fixed, in closed form: L is quadratic in the row's ``2G`` unknowns
   ``(s_1..s_G, m_1..m_G)``; the normal equations (a ``2G × 2G`` system per row, float64, a 1e-12
   relative ridge so a group whose codes are all equal stays solvable) are solved for every row in one
   batched solve;
3. a row takes the new (codes, s, m) only when its L drops; the loop stops after ``iterations`` or when
   fewer than ``tol`` of the rows improved.

Guarantees: the objective (float64, evaluated with the float32 scales and offsets that are stored) never
increases from one iteration to the next, row by row; with ``iterations=1`` each row is GPTQ's codes,
scale and offset exactly (or min-max RTN's where that has the lower L); non-finite weights or Hessians
are a :class:`~qcompile.errors.NonFiniteError`, a Hessian singular even after damping a
:class:`~qcompile.errors.PlanError`, unsupported widths a PlanError (:func:`qcompile.quant.spec.check_bits`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from qcompile.quant.finite import check_finite, check_scale
from qcompile.quant.gptq import cholesky, damped_hessian, gptq_quantize
from qcompile.quant.quantizer import code_dtype, num_groups, quantize_weight_groups
from qcompile.quant.spec import check_bits, levels


class Rounding(str, enum.Enum):
    """How decoupleQ's integer step turns the fixed-grid problem into codes."""

    GPTQ = "gptq"  # sequential rounding with error feedback through H⁻¹ on the fixed grid
    NEAREST = "nearest"  # projected-gradient steps on the relaxed (box) problem, then round to nearest


@dataclass(frozen=True)
class DecoupleQResult:
    """Codes ``[N, K]`` (unsigned, :func:`code_dtype` ``(bits, False)``), float32 scale and offset
    ``[N, G]`` (``w ≈ codes·scale + offset``), the objective ``Σ_rows L`` after each iteration (index 0:
    the initialization) and, per alternation, how many rows improved."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    objective: tuple[float, ...]
    improved: tuple[int, ...]
    gptq_rows: int  # rows where the GPTQ pass beat min-max RTN at the initialization
    rtn_objective: float  # Σ_rows L of min-max RTN
    gptq_objective: float  # Σ_rows L of the GPTQ pass


def _expand(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """``[N, G]`` group parameters repeated over their columns → ``[N, K]``."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """``codes·s + m`` in float64."""
    k = codes.shape[1]
    s, m = scale.to(torch.float64), offset.to(torch.float64)
    return codes.to(torch.float64) * _expand(s, group_size, k) + _expand(m, group_size, k)


def row_losses(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(w − ŵ)ᵀ H (w − ŵ)`` per row, float64 ``[N]``."""
    r = weight.to(torch.float64) - approx.to(torch.float64)
    return ((r @ h) * r).sum(dim=1)


def solve_scales(
    weight: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    group_size: int,
    *,
    hw: torch.Tensor | None = None,
    ridge: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-row, per-group ``(s, m)`` minimizing ``(w − ŵ)ᵀ H (w − ŵ)`` for fixed ``codes`` (float64).

    Row ``i``'s normal equations ``[[A_ss, A_sm], [A_msᵀ, A_mm]] [s; m] = [b_s; b_m]`` with
    ``A_ss[g, h] = Σ_{j∈g, l∈h} u_j H_jl u_l``, ``A_sm[g, h] = Σ_{j∈g, l∈h} u_j H_jl``,
    ``A_mm[g, h] = Σ_{j∈g, l∈h} H_jl``, ``b_s[g] = Σ_{j∈g} u_j (Hw)_j``, ``b_m[g] = Σ_{j∈g} (Hw)_j``.
    ``hw``: ``weight @ h`` when already known. Returns ``(scale, offset, ok)``; ``ok[i]`` is False
    where row ``i``'s system could not be solved (its values are then NaN: keep the old ones).
    """
    n, k = weight.shape
    gs = group_size
    g = num_groups(k, gs)
    kp = g * gs
    u = torch.nn.functional.pad(codes.to(torch.float64), (0, kp - k))  # [N, Kp]
    hp = torch.nn.functional.pad(h, (0, kp - k, 0, kp - k))  # [Kp, Kp], zero rows/cols for the padding
    w = weight.to(torch.float64)
    hw = (w @ h) if hw is None else hw
    hwp = torch.nn.functional.pad(hw, (0, kp - k))
    ug = u.view(n, g, gs)
    # R[n, j, h] = Σ_{l∈h} H_jl u_nl: one GEMM per group of columns
    r = torch.einsum("jhl,nhl->njh", hp.view(kp, g, gs), ug)  # [N, Kp, G]
    a_ss = torch.einsum("ngj,ngjh->ngh", ug, r.view(n, g, gs, g))
    hsum = hp.view(kp, g, gs).sum(dim=2)  # [Kp, G]: Σ_{l∈h} H_jl
    a_sm = torch.einsum("ngj,gjh->ngh", ug, hsum.view(g, gs, g))
    a_mm = hsum.view(g, gs, g).sum(dim=1)  # [G, G]
    b_s = (ug * hwp.view(n, g, gs)).sum(dim=2)
    b_m = hwp.view(n, g, gs).sum(dim=2)
    a = torch.cat(
        [torch.cat([a_ss, a_sm], dim=2), torch.cat([a_sm.transpose(1, 2), a_mm.expand(n, g, g)], dim=2)], dim=1
    )  # [N, 2G, 2G]
    diag = torch.diagonal(a, dim1=1, dim2=2)
    a = a + torch.diag_embed(ridge * (diag + diag.mean(dim=1, keepdim=True)))
    b = torch.cat([b_s, b_m], dim=1)[..., None]
    sol, info = torch.linalg.solve_ex(a, b)
    sol = sol[..., 0]
    ok = (info == 0) & torch.isfinite(sol).all(dim=1)
    return sol[:, :g], sol[:, g:], ok


def _lambda_max(h: torch.Tensor, steps: int = 30) -> float:
    """Largest eigenvalue of the symmetric PSD ``h`` (power iteration, with a 1 % margin)."""
    v = torch.ones(h.shape[0], dtype=h.dtype) / h.shape[0] ** 0.5
    lam = 0.0
    for _ in range(steps):
        hv = h @ v
        lam = float(hv.norm())
        if lam == 0.0:
            return 1.0
        v = hv / lam
    return 1.01 * lam


def _relaxed_nearest(
    w: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
    qmax: int,
    steps: int,
    lam: float,
) -> torch.Tensor:
    """FISTA on ``min_u (c − s⊙u)ᵀH(c − s⊙u)`` over the box ``[0, qmax]`` (``c = w − m``), from ``u``; rounded."""
    c = w - m
    lip = 2.0 * (s * s).amax(dim=1, keepdim=True) * lam  # [N, 1]
    step = 1.0 / torch.where(lip > 0, lip, torch.ones_like(lip))
    x = u.clone()
    y, t = x.clone(), 1.0
    for _ in range(steps):
        grad = -2.0 * s * ((c - s * y) @ h)
        x_new = torch.clamp(y - step * grad, 0, qmax)
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return torch.clamp(torch.round(x), 0, qmax)


def decoupleq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    iterations: int = 8,
    inner_steps: int = 20,
    rounding: Rounding = Rounding.GPTQ,
    tol: float = 0.01,
) -> DecoupleQResult:
    """decoupleQ-quantize ``weight[N, K]`` with the (undamped) Hessian ``[K, K]`` of its inputs, asymmetric
    ``bits``-bit codes in groups of ``group_size`` columns (``K``: one group per row); see the module doc."""
    check_bits(bits)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1 (1: the GPTQ/min-max initialization only), got {iterations}")
    check_finite(weight, f"the weight {list(weight.shape)} being quantized (decoupleq)")
    check_finite(hessian, "the Hessian of the layer's calibration inputs (decoupleq)", "check the calibration data")
    rounding = Rounding(rounding)
    n, k = weight.shape
    gs = group_size
    _, qmax = levels(bits, False)
    h, dead = damped_hessian(hessian, damp)
    cholesky(h, damp, "decoupleq")  # a singular damped Hessian is a PlanError before any work
    w = weight.detach().to(torch.float64).clone()
    w[:, dead] = 0.0  # as GPTQ: a column that never saw input is quantized as 0
    hw = w @ h

    def loss(codes: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return row_losses(w, dequantize(codes, s, m, gs), h)

    rc, rs, ro = quantize_weight_groups(w.to(torch.float32), bits, gs, symmetric=False)
    gc, gsc, go = gptq_quantize(weight, hessian, bits, gs, symmetric=False, damp=damp)
    assert ro is not None and go is not None
    l_rtn, l_gptq = loss(rc, rs, ro), loss(gc, gsc, go)
    use_gptq = l_gptq <= l_rtn
    sel = use_gptq[:, None]
    codes = torch.where(sel, gc.to(torch.float64), rc.to(torch.float64))
    scale = torch.where(sel, gsc, rs).to(torch.float32)
    offset = torch.where(sel, go, ro).to(torch.float32)
    best = torch.where(use_gptq, l_gptq, l_rtn)
    objective = [float(best.sum())]
    improved: list[int] = []
    lam = _lambda_max(h) if rounding is Rounding.NEAREST and iterations > 1 else 0.0
    for _ in range(iterations - 1):
        if rounding is Rounding.GPTQ:
            cand, _, _ = gptq_quantize(weight, hessian, bits, gs, symmetric=False, damp=damp, grid=(scale, offset))
            cand = cand.to(torch.float64)
        else:
            s64, m64 = _expand(scale.to(torch.float64), gs, k), _expand(offset.to(torch.float64), gs, k)
            cand = _relaxed_nearest(w, h, codes, s64, m64, qmax, inner_steps, lam)
        s_new, m_new, ok = solve_scales(w, h, cand, gs, hw=hw)
        s_new = torch.where(ok[:, None], s_new, scale.to(torch.float64)).to(torch.float32)
        m_new = torch.where(ok[:, None], m_new, offset.to(torch.float64)).to(torch.float32)
        check_scale(s_new, "a weight group (decoupleq)")
        l_new = loss(cand, s_new, m_new)
        better = l_new < best
        codes = torch.where(better[:, None], cand, codes)
        scale = torch.where(better[:, None], s_new, scale)
        offset = torch.where(better[:, None], m_new, offset)
        best = torch.where(better, l_new, best)
        objective.append(float(best.sum()))
        improved.append(int(better.sum()))
        if int(better.sum()) < tol * n:
            break
    return DecoupleQResult(
        codes=codes.to(code_dtype(bits, False)),
        scale=scale,
        offset=offset,
        objective=tuple(objective),
        improved=tuple(improved),
        gptq_rows=int(use_gptq.sum()),
        rtn_objective=float(l_rtn.sum()),
        gptq_objective=float(l_gptq.sum()),
    )


__all__ = ["DecoupleQResult", "Rounding", "decoupleq_quantize", "dequantize", "row_losses", "solve_scales"]
