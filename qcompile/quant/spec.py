"""What a quantized tensor is: the integer grid, the allowed widths and the blocks that share a scale.

This module is the one place that defines them; plans, passes, ops and kernels ask it:

* :data:`BITS` — the widths qcompile quantizes to, for weights, activations and caches alike;
* :func:`levels` — the integer grid of a width: symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the most
  negative code is unused so the grid is symmetric around zero) or asymmetric ``[0, 2^b-1]``;
* :class:`Grid` — the grid's kind: ``uniform`` (the grids above, absmax or min/max scales) or
  ``quest`` (QuEST: a midrise grid with no zero level, clipped at ``α_b·σ`` with σ the block's RMS:
  :mod:`qcompile.quant.quest`);
* :class:`QuantSpec` — one tensor's quantization (bits, granularity, symmetry, group size,
  static/dynamic, grid), with :meth:`QuantSpec.block` resolving how many consecutive input channels
  share a scale, so there is one convention (an int, the full row for one scale per row);
* :func:`check_group` — a group size that does not divide a layer's width is a PlanError naming the
  layer, unless the spec allows a shorter last group.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qcompile.errors import PlanError

BITS = (2, 3, 4, 6, 8)


def check_bits(bits: object, what: str = "bits") -> int:
    """``bits`` when it is one of :data:`BITS`, else a PlanError naming ``what``."""
    if isinstance(bits, bool) or bits not in BITS:
        raise PlanError(f"{what}={bits!r} is not supported; allowed: {list(BITS)}")
    return int(bits)  # type: ignore[call-overload]


def levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid of ``bits`` bits."""
    check_bits(bits)
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


class Granularity(str, enum.Enum):
    """How many scales a quantized tensor carries."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # weights: one scale per output channel; static activations: per input channel
    PER_GROUP = "per_group"  # one scale per `group_size` consecutive input channels of a row
    PER_TOKEN = "per_token"  # activations: one scale per token (row)


class Grid(str, enum.Enum):
    """The kind of integer grid a tensor is quantized to."""

    UNIFORM = "uniform"  # levels(bits, symmetric) with an absmax (or min/max) scale
    QUEST = "quest"  # midrise, RMS-scaled, MSE-optimal Gaussian clip (qcompile.quant.quest)


@dataclass(frozen=True)
class QuantSpec:
    """Integer quantization of one tensor: ``q = clamp(round(x / s) + z)`` with ``bits`` bits."""

    bits: int
    granularity: Granularity
    symmetric: bool = True
    group_size: int | None = None
    dynamic: bool = True  # activations: scales computed at run time (True) or calibrated (False)
    # per_group only: when group_size does not divide the channels, allow a shorter last group
    # (the same numbers as zero-padding K to a multiple). False: such a layer is a PlanError.
    partial_last_group: bool = False
    grid: Grid = Grid.UNIFORM

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.grid is Grid.QUEST and (not self.symmetric or not self.dynamic):
            raise PlanError(
                "grid 'quest' is a symmetric midrise grid with scales from each block's RMS: it needs "
                "symmetric: true and dynamic: true"
            )
        if self.granularity is Granularity.PER_GROUP:
            if self.group_size is None or self.group_size <= 0:
                raise PlanError("granularity 'per_group' needs a positive group_size (e.g. 128)")
        elif self.group_size is not None or self.partial_last_group:
            raise PlanError(
                "group_size/partial_last_group are only meaningful with granularity 'per_group', not "
                f"{self.granularity.value!r}"
            )

    @property
    def levels(self) -> tuple[int, int]:
        return levels(self.bits, self.symmetric)

    def block(self, k: int) -> int:
        """Consecutive input channels (of a row of width ``k``) that share one scale: the group
        size for ``per_group``, else the whole row."""
        return int(self.group_size) if self.granularity is Granularity.PER_GROUP and self.group_size else k


def check_group(path: str, k: int, spec: QuantSpec) -> None:
    """PlanError unless ``spec``'s group size divides ``k`` (or the spec allows a partial last group)."""
    g = spec.group_size
    if spec.granularity is not Granularity.PER_GROUP or g is None or k % g == 0 or spec.partial_last_group:
        return
    divisors = [d for d in range(8, k + 1, 8) if k % d == 0][-4:]
    raise PlanError(
        f"layer {path!r}: group_size {g} does not divide its {k} input channels; use a divisor "
        f"(e.g. {divisors}) or set partial_last_group: true to allow a shorter last group"
    )


__all__ = ["BITS", "Granularity", "Grid", "QuantSpec", "check_bits", "check_group", "levels"]
