"""Non-finite values (NaN, ±Inf) in tensors: counting, describing, refusing, replacing.

The quantizers never turn a NaN into a plausible number: a NaN or infinite weight, or a scale that
overflows, is a :class:`~qcompile.errors.NonFiniteError` naming what was being quantized. These
helpers give every check the same wording: ``"1 NaN, 0 +Inf, 0 -Inf among 8192 values (first at
index [3, 5])"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qcompile.errors import NonFiniteError


@dataclass(frozen=True)
class NonFiniteCounts:
    """How many NaN / +Inf / -Inf values a tensor holds, among how many, and the first one's index."""

    nan: int
    posinf: int
    neginf: int
    numel: int
    first_index: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.nan + self.posinf + self.neginf

    def describe(self) -> str:
        return (
            f"{self.nan} NaN, {self.posinf} +Inf, {self.neginf} -Inf among {self.numel} values "
            f"(first at index {list(self.first_index)})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "numel": self.numel,
            "first_index": list(self.first_index),
        }


def is_finite(t: torch.Tensor) -> bool:
    """True for integer/bool tensors and for floating tensors without NaN or ±Inf."""
    return not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())


def nonfinite_counts(t: torch.Tensor) -> NonFiniteCounts | None:
    """The non-finite values of ``t`` (None when it has none)."""
    if is_finite(t):
        return None
    t = t.detach()
    bad = ~torch.isfinite(t)
    first = tuple(int(i) for i in bad.nonzero()[0]) if t.dim() else ()
    return NonFiniteCounts(
        nan=int(torch.isnan(t).sum()),
        posinf=int(torch.isposinf(t).sum()) if not t.is_complex() else 0,
        neginf=int(torch.isneginf(t).sum()) if not t.is_complex() else 0,
        numel=t.numel(),
        first_index=first,
    )


def check_finite(t: torch.Tensor, what: str, fix: str = "") -> None:
    """NonFiniteError ``"<what> holds 1 NaN, ... (first at index [i, j])"`` when ``t`` is not finite."""
    counts = nonfinite_counts(t)
    if counts is not None:
        raise NonFiniteError(f"{what} holds {counts.describe()}" + (f"; {fix}" if fix else ""))


def check_scale(scale: torch.Tensor, what: str) -> None:
    """NonFiniteError when a computed scale overflowed (finite inputs whose range exceeds float32)."""
    check_finite(
        scale,
        f"the quantization scale of {what}",
        "the values' range overflows float32 (|values| near 3.4e38); rescale the layer",
    )


def replace_nonfinite(t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A new tensor equal to ``t`` with every NaN / ±Inf replaced by ``value`` (``t`` untouched)."""
    return torch.where(torch.isfinite(t), t, torch.full_like(t, value))


@contextmanager
def naming(where: str) -> Iterator[None]:
    """Prefix ``where`` (say ``"layer 'model.layers.0.mlp.up_proj'"``) to a NonFiniteError raised inside."""
    try:
        yield
    except NonFiniteError as e:
        raise NonFiniteError(f"{where}: {e}") from e


__all__ = [
    "NonFiniteCounts",
    "check_finite",
    "check_scale",
    "is_finite",
    "naming",
    "nonfinite_counts",
    "replace_nonfinite",
]
