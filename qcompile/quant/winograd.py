"""Winograd F(m, r) transforms from interpolation points, in exact rational arithmetic.

Construction (Toom–Cook with the point at infinity). With ``α = m + r − 1`` and ``α − 1``
distinct finite points ``p_i`` plus ∞, the linear convolution ``c = a * g`` (lengths m and r) is
``c(x) = c_top·M(x) + Σ_i c(p_i)·N_i(x)/f_i`` where ``M(x) = Π_i (x − p_i)``,
``N_i(x) = Π_{j≠i} (x − p_j)``, ``f_i = Π_{j≠i} (p_i − p_j)`` and ``c_top = a_{m−1}·g_{r−1}`` (the
value "at ∞"). Transposing that algorithm gives the correlation ``y_k = Σ_t g_t·d_{k+t}`` used by
convolution layers::

    y = Aᵀ [ (G g) ⊙ (Bᵀ d) ]            (1-D)
    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A      (2-D, an α×α tile in, an m×m tile out)

    Aᵀ[j, i] = p_i^j (j < m),   last column e_(m−1)          (m × α)
    G[i, t]  = p_i^t / f_i,     last row e_(r−1)             (α × r)
    Bᵀ[i, :] = coefficients of N_i (lowest first), last row those of M   (α × α)

:func:`verify` proves the identity exactly (Fractions) on random integer data; :func:`kappa`
reports the 2-norm condition number of the square Vandermonde matrix of the finite points.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from qcompile.quant.finite import check_finite

Matrix = list[list[Fraction]]


@dataclass(frozen=True)
class Transforms:
    m: int
    r: int
    points: tuple[Fraction, ...]  # the α − 1 finite points (∞ is implied)
    AT: Matrix  # m × α
    G: Matrix  # α × r
    BT: Matrix  # α × α

    @property
    def alpha(self) -> int:
        return self.m + self.r - 1

    def as_arrays(self, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Aᵀ, G, Bᵀ) as float arrays (rounded once from the exact values)."""
        return tuple(np.array([[float(v) for v in row] for row in M], dtype=dtype) for M in (self.AT, self.G, self.BT))  # type: ignore[return-value]


def _poly_from_roots(roots: Sequence[Fraction]) -> list[Fraction]:
    coeffs = [Fraction(1)]  # lowest degree first
    for root in roots:
        nxt = [Fraction(0)] * (len(coeffs) + 1)
        for k, c in enumerate(coeffs):
            nxt[k + 1] += c
            nxt[k] -= root * c
        coeffs = nxt
    return coeffs


def as_points(points: Sequence[object]) -> tuple[Fraction, ...]:
    """Finite points as Fractions (ints, Fractions, or strings like ``"5/6"``)."""
    out = []
    for p in points:
        if isinstance(p, float):
            raise ValueError(f"give points as exact rationals (int, Fraction or 'a/b' string), not float {p!r}")
        out.append(Fraction(p))  # type: ignore[arg-type]
    return tuple(out)


def transforms(points: Sequence[object], m: int, r: int = 3) -> Transforms:
    """Aᵀ, G, Bᵀ of F(m, r) from the ``m + r − 2`` finite ``points`` (∞ is always added)."""
    if m < 1 or r < 1:
        raise ValueError(f"F(m, r) needs m >= 1 and r >= 1, got F({m}, {r})")
    pts = as_points(points)
    alpha = m + r - 1
    if len(pts) != alpha - 1:
        raise ValueError(f"F({m},{r}) needs {alpha - 1} distinct finite points (plus infinity), got {len(pts)}")
    if len(set(pts)) != len(pts):
        dup = sorted({str(p) for p in pts if pts.count(p) > 1})
        raise ValueError(f"interpolation points must be distinct; duplicated: {dup}")
    zero, one = Fraction(0), Fraction(1)
    AT = [[p**j for p in pts] + [one if j == m - 1 else zero] for j in range(m)]
    G = []
    BT = []
    for i, p in enumerate(pts):
        others = [q for j, q in enumerate(pts) if j != i]
        f = one
        for q in others:
            f *= p - q
        G.append([p**t / f for t in range(r)])
        BT.append(_poly_from_roots(others) + [zero])
    G.append([one if t == r - 1 else zero for t in range(r)])
    BT.append(_poly_from_roots(pts))
    return Transforms(m, r, pts, AT, G, BT)


def _matvec(M: Matrix, v: Sequence[Fraction]) -> list[Fraction]:
    return [sum((a * b for a, b in zip(row, v, strict=True)), Fraction(0)) for row in M]


def _matmul(A: Matrix, B: Matrix) -> Matrix:
    cols = list(zip(*B, strict=True))
    return [[sum((a * b for a, b in zip(row, col, strict=True)), Fraction(0)) for col in cols] for row in A]


def _transpose(A: Matrix) -> Matrix:
    return [list(c) for c in zip(*A, strict=True)]


def verify(t: Transforms, trials: int = 8, seed: int = 0) -> None:
    """Raise AssertionError unless 1-D and 2-D Winograd equal direct correlation exactly."""
    rng = random.Random(seed)
    a, m, r = t.alpha, t.m, t.r
    for _ in range(trials):
        g = [Fraction(rng.randint(-9, 9)) for _ in range(r)]
        d = [Fraction(rng.randint(-9, 9)) for _ in range(a)]
        direct = [sum((g[k] * d[i + k] for k in range(r)), Fraction(0)) for i in range(m)]
        wino = _matvec(t.AT, [x * y for x, y in zip(_matvec(t.G, g), _matvec(t.BT, d), strict=True)])
        if wino != direct:
            raise AssertionError(f"1-D F({m},{r}) with points {list(map(str, t.points))} is wrong: {wino} != {direct}")
    g2 = [[Fraction(rng.randint(-9, 9)) for _ in range(r)] for _ in range(r)]
    d2 = [[Fraction(rng.randint(-9, 9)) for _ in range(a)] for _ in range(a)]
    U = _matmul(_matmul(t.G, g2), _transpose(t.G))
    V = _matmul(_matmul(t.BT, d2), _transpose(t.BT))
    Y = _matmul(
        _matmul(t.AT, [[u * v for u, v in zip(ru, rv, strict=True)] for ru, rv in zip(U, V, strict=True)]),
        _transpose(t.AT),
    )
    direct2 = [
        [sum((g2[u][v] * d2[i + u][j + v] for u in range(r) for v in range(r)), Fraction(0)) for j in range(m)]
        for i in range(m)
    ]
    if Y != direct2:
        raise AssertionError(f"2-D F({m},{r}) with points {list(map(str, t.points))} is wrong")


def kappa(points: Sequence[object]) -> float:
    """2-norm condition number of the square Vandermonde matrix ``V[i, j] = p_i^j`` of the points."""
    pts = [float(p) for p in as_points(points)]
    V = np.vander(np.array(pts, dtype=np.float64), increasing=True)
    return float(np.linalg.cond(V, 2))


def symmetric(*magnitudes: object) -> tuple[Fraction, ...]:
    """``0`` and ``±x`` for each magnitude: ``symmetric(1, 2) == (0, 1, -1, 2, -2)``."""
    out = [Fraction(0)]
    for x in as_points(magnitudes):
        out += [x, -x]
    return tuple(out)


# Named point sets (finite points; ∞ is implied). "integer": the usual small integers;
# "fractional": the conventional {0, ±1, ±2, ±1/2, ...}; "nova": from NOVA (arXiv 2512.18453).
POINT_SETS: dict[tuple[int, str], tuple[Fraction, ...]] = {
    (2, "integer"): symmetric(1),
    (4, "integer"): symmetric(1, 2),
    (6, "integer"): symmetric(1, 2, 3),
    (8, "integer"): symmetric(1, 2, 3, 4),
    (4, "fractional"): symmetric(1, 2),
    (6, "fractional"): symmetric(1, 2, "1/2"),
    (8, "fractional"): symmetric(1, 2, "1/2", "1/4"),
    (4, "nova"): symmetric("5/6", "7/6"),
    (6, "nova"): symmetric("3/5", 1, "7/6"),
    (8, "nova"): symmetric("2/5", "5/6", 1, "7/6"),
    # qcompile's searched sets: `python benchmarks/winograd.py --search` (evolution strategy scored by
    # the measured fp16 error on fmnist-vgg conv inputs of 64 training images; denominators <= 10).
    # For F(6,3) every search run (seeds 0-2, denominators <= 10/12/16, dyadic or not) returned the
    # conventional fractional set: nothing better was found, so "searched" is that set.
    (4, "searched"): symmetric("3/4", "3/2"),
    (6, "searched"): symmetric("1/2", 1, 2),
    (8, "searched"): symmetric("3/7", "4/5", "5/4", 2),
}

# The default ("best") named set per tile size m: the set with the lowest measured fp16 error
# (benchmarks/winograd.py; see benchmarks/RESULTS.md).
BEST: dict[int, str] = {2: "integer", 4: "searched", 6: "fractional", 8: "searched"}


def transform_weight(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``U[i, j, o, c] = (G g[o, c] Gᵀ)[i, j]`` in float64, returned as float32 (NonFiniteError for a
    weight holding NaN/±Inf, or a transformed weight that overflows float32)."""
    check_finite(weight, f"the convolution weight {list(weight.shape)} being transformed (Winograd)")
    g = weight.to(torch.float64)
    G64 = G.to(torch.float64)
    u = G64 @ g @ G64.t()  # [O, C, α, α]
    out = u.permute(2, 3, 0, 1).contiguous().to(torch.float32)
    check_finite(out, "the Winograd-transformed weight", "the weight's magnitude overflows float32 after G g Gᵀ")
    return out
