"""Block-diagonal normalized Hadamard rotations (QuEST, QuaRot): matrices, the fast Walsh–Hadamard
transform and the block-size rule.

* :func:`sylvester` — the normalized Sylvester Hadamard matrix ``H_b`` (``b`` a power of two):
  ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, −H_n]] / √2``; symmetric and orthogonal (``H·H = I``);
* :func:`hadamard_blocks` — how a width is cut into power-of-two blocks (the rule below);
* :func:`fwht` — ``x @ diag(H_b1, H_b2, …)`` along the last axis with the butterfly: ``log2 b``
  stages of sums and differences per block, ``O(K·log b)`` operations instead of the dense
  ``O(K·b)``, then one scale by ``1/√b``; computed in float32 (float64 inputs stay float64);
* :func:`dense_block_hadamard` / :func:`rotate_dense` — the dense block-diagonal matrix and its
  product: the oracle the butterfly and the compiled kernels are tested against.

Because every block is symmetric and orthogonal, ``(x·H)(W·H)ᵀ = x·H·Hᵀ·Wᵀ = x·Wᵀ``: rotating a
linear's input and the columns of its weight leaves its output unchanged (the ``hadamard`` pass).

**Widths that are not a multiple of the largest block** (SmolLM2: hidden 576 = 4·128 + 64; head dim
64; intermediate 1536 = 12·128). Two rules (:class:`BlockRule`):

* ``greedy`` (the default): blocks of ``max_block`` from the left, then the remainder as descending
  powers of two (its binary digits): 576 → 128, 128, 128, 128, 64. Any width works (an odd width
  ends in a block of 1, i.e. one channel left as it is) and as many channels as possible are mixed
  over the full 128: the rotation's point is to spread an outlier channel over many channels, and
  a token's RMS-scaled grid (QuEST) sees a block of b Gaussian-like values when b is large.
* ``uniform``: the largest power of two ≤ ``max_block`` dividing the width, repeated: 576 → 9 × 64.
  All blocks equal (one butterfly shape), but 576 is rotated in blocks of 64 only.

The greedy rule is the default because it keeps 512 of SmolLM2's 576 channels in 128-blocks; the
``benchmarks/quest.py`` measurement (benchmarks/RESULTS.md, QuEST section) compares both on the
model's real activations.
"""

from __future__ import annotations

import enum
import functools
import math

import torch


class BlockRule(str, enum.Enum):
    """How a width that ``max_block`` does not divide is cut into power-of-two blocks."""

    GREEDY = "greedy"  # max_block-wide blocks, then the remainder as descending powers of two
    UNIFORM = "uniform"  # the largest power of two <= max_block dividing the width, repeated


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


@functools.cache
def _sylvester64(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def sylvester(b: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order ``b`` (a power of two)."""
    if not is_power_of_two(b):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {b!r}")
    return _sylvester64(b).to(dtype)


def hadamard_blocks(width: int, max_block: int = 128, rule: BlockRule = BlockRule.GREEDY) -> tuple[int, ...]:
    """The power-of-two blocks (left to right, summing to ``width``) that rotate a width (see the module
    docstring for the two rules)."""
    if not is_power_of_two(max_block):
        raise ValueError(f"max_block must be a power of two, got {max_block!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if rule is BlockRule.UNIFORM:
        b = math.gcd(width, max_block)  # the largest power of two <= max_block dividing width
        return (b,) * (width // b)
    full, rest = divmod(width, max_block)
    tail = tuple(1 << i for i in reversed(range(rest.bit_length())) if rest >> i & 1)
    return (max_block,) * full + tail


def _check_blocks(blocks: tuple[int, ...] | list[int], width: int) -> None:
    if not blocks or not all(is_power_of_two(b) for b in blocks) or sum(blocks) != width:
        raise ValueError(f"blocks {list(blocks)} must be powers of two summing to the width {width}")


def _runs(blocks: tuple[int, ...] | list[int]) -> list[tuple[int, int, int]]:
    """(start, block, count) of each run of equal consecutive blocks."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for b in blocks:
        if out and out[-1][1] == b and out[-1][0] + out[-1][1] * out[-1][2] == start:
            s, bb, c = out[-1]
            out[-1] = (s, bb, c + 1)
        else:
            out.append((start, b, 1))
        start += b
    return out


def _butterfly(x: torch.Tensor, b: int) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform of every length-``b`` row of ``x[..., b]`` (Sylvester order)."""
    lead = x.shape[:-1]
    h = 1
    while h < b:
        y = x.reshape(*lead, b // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + c, a - c), dim=-2).reshape(*lead, b)
        h *= 2
    return x


def fwht(x: torch.Tensor, blocks: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``x @ diag(H_b for b in blocks)`` along the last axis by the butterfly (float32 math; float64
    stays float64; the result has ``x``'s dtype). NaN/Inf propagate (into their block)."""
    width = x.shape[-1]
    _check_blocks(blocks, width)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    parts = []
    for start, b, count in _runs(blocks):
        seg = xf[..., start : start + b * count].reshape(*x.shape[:-1], count, b)
        parts.append((_butterfly(seg, b) * (1.0 / math.sqrt(b))).reshape(*x.shape[:-1], b * count))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.to(x.dtype)


def dense_block_hadamard(blocks: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense block-diagonal matrix ``diag(H_b for b in blocks)`` (symmetric, orthogonal)."""
    _check_blocks(blocks, sum(blocks))
    return torch.block_diag(*[sylvester(b, dtype) for b in blocks])


def rotate_dense(x: torch.Tensor, blocks: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The oracle: ``x @ dense_block_hadamard(blocks)`` in float64."""
    return x.to(torch.float64) @ dense_block_hadamard(blocks)


def rotate_columns(w: torch.Tensor, blocks: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``W·H`` (a linear weight ``[out, in]`` whose input is rotated), computed in float64."""
    return fwht(w.to(torch.float64), blocks).to(w.dtype)


def rotate_rows(w: torch.Tensor, blocks: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``H·W`` (a linear weight, or a 1-D bias, whose *output* is rotated: ``y·H = x·(H·W)ᵀ``), in float64."""
    if w.dim() == 1:
        return fwht(w.to(torch.float64), blocks).to(w.dtype)
    return fwht(w.to(torch.float64).t(), blocks).t().contiguous().to(w.dtype)


__all__ = [
    "BlockRule",
    "dense_block_hadamard",
    "fwht",
    "hadamard_blocks",
    "is_power_of_two",
    "rotate_columns",
    "rotate_dense",
    "rotate_rows",
    "sylvester",
]
