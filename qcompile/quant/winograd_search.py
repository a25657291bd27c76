"""Search Winograd interpolation points by their *measured* fp16 error (beyond NOVA's κ criterion).

The search space is symmetric sets ``{0, ±x_1, …, ±x_k}`` (k = (α − 2) / 2, ∞ implied), the
parametrization NOVA's published sets share. A (μ, λ) evolution strategy over ``log x_i`` proposes
candidates; every candidate is first snapped to simple rationals (denominator ≤ ``max_den``),
must pass the exact verifier, and is scored by the error it actually produces: the median over
the given layers of the relative error of the fp16 Winograd convolution (the
``qcompile::winograd_conv2d`` fp16 path) against the fp32 direct convolution, on real layer inputs
(from calibration data, never the evaluation set). Deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from qcompile.quant import winograd


@dataclass(frozen=True)
class ConvSample:
    """One layer's real input and weights (3×3, stride 1) and its padding."""

    x: torch.Tensor
    weight: torch.Tensor
    padding: tuple[int, int]
    groups: int = 1


def direct(s: ConvSample) -> torch.Tensor:
    """The fp32 direct convolution of a sample (the reference)."""
    return torch.nn.functional.conv2d(s.x, s.weight, None, padding=s.padding, groups=s.groups)


def fp16_error(
    points: Sequence[Fraction], m: int, samples: Sequence[ConvSample], refs: Sequence[torch.Tensor] | None = None
) -> float:
    """Median over samples of ‖fp16 Winograd − fp32 direct‖ / ‖fp32 direct‖ (inf if not finite);
    ``refs`` are the samples' :func:`direct` outputs when the caller already has them."""
    t = winograd.transforms(points, m, 3)
    AT, G, BT = (torch.tensor(a, dtype=torch.float32) for a in t.as_arrays())
    errs = []
    for s, ref in zip(samples, refs if refs is not None else [direct(s) for s in samples], strict=True):
        y = torch.ops.qcompile.winograd_conv2d(
            s.x, winograd.transform_weight(s.weight, G), AT, BT, None, m, list(s.padding), True
        )
        e = float((y - ref).norm() / ref.norm())
        errs.append(e if math.isfinite(e) else math.inf)
    errs.sort()
    return errs[len(errs) // 2]


def snap(magnitudes: Sequence[float], max_den: int, dyadic: bool = False) -> tuple[Fraction, ...] | None:
    """``{0, ±x_i}`` with each x_i the nearest fraction of denominator ≤ max_den (``dyadic``: the
    nearest multiple of 1/2^j, 2^j ≤ max_den, whose transforms are exact in binary floats); None if
    degenerate."""
    if dyadic:
        den = 1 << (max_den.bit_length() - 1)
        xs = [Fraction(round(abs(x) * den), den) for x in magnitudes]
    else:
        xs = [Fraction(abs(x)).limit_denominator(max_den) for x in magnitudes]
    if any(x == 0 for x in xs) or len(set(xs)) != len(xs):
        return None
    return winograd.symmetric(*sorted(xs))


@dataclass(frozen=True)
class SearchResult:
    points: tuple[Fraction, ...]
    error: float
    evaluations: int
    history: tuple[float, ...]  # best error after each generation


def search(
    m: int,
    samples: Sequence[ConvSample],
    *,
    starts: Sequence[Sequence[Fraction]] = (),
    generations: int = 20,
    population: int = 12,
    parents: int = 3,
    sigma: float = 0.25,
    max_den: int = 10,
    dyadic: bool = False,
    seed: int = 0,
) -> SearchResult:
    """(μ, λ)-ES over log-magnitudes of a symmetric point set for F(m, 3); see the module docstring."""
    k = m // 2
    if m % 2 != 0 or k < 1:
        raise ValueError(f"symmetric point sets need an even m >= 2, got m={m}")
    gen = torch.Generator().manual_seed(seed)
    refs = [direct(s) for s in samples]
    seen: dict[tuple[Fraction, ...], float] = {}

    def score(log_x: torch.Tensor) -> tuple[float, tuple[Fraction, ...] | None]:
        pts = snap([math.exp(float(v)) for v in log_x], max_den, dyadic)
        if pts is None:
            return math.inf, None
        if pts not in seen:
            winograd.verify(winograd.transforms(pts, m, 3), trials=1)
            seen[pts] = fp16_error(pts, m, samples, refs)
        return seen[pts], pts

    pool: list[tuple[float, torch.Tensor]] = []
    for st in starts:
        mags = sorted({abs(p) for p in st if p != 0})
        if len(mags) == k:
            lx = torch.tensor([math.log(float(v)) for v in mags])
            pool.append((score(lx)[0], lx))
    while len(pool) < parents:
        lx = torch.sort(torch.randn(k, generator=gen) * 0.5).values
        pool.append((score(lx)[0], lx))
    pool.sort(key=lambda t: t[0])
    history = []
    for _ in range(generations):
        elite = pool[:parents]
        children = []
        for i in range(population):
            base = elite[i % parents][1]
            child = torch.sort(base + sigma * torch.randn(k, generator=gen)).values
            children.append((score(child)[0], child))
        pool = sorted(elite + children, key=lambda t: t[0])
        history.append(pool[0][0])
        sigma *= 0.93
    best_err, best_lx = pool[0]
    pts = snap([math.exp(float(v)) for v in best_lx], max_den, dyadic)
    assert pts is not None
    return SearchResult(pts, best_err, len(seen), tuple(history))
