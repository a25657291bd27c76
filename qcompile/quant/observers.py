"""Calibration observers: running statistics of the activations entering a layer.

Each observer takes ``update(x)`` for every calibration batch (``x[..., K]``, the layer input)
and keeps only a summary, so memory does not grow with the calibration set:

* :class:`AbsMaxObserver`: running max |x| per input channel (static per-channel steps,
  SmoothQuant's ``max|X_j|``), and per tensor;
* :class:`TokenStatsObserver`: distribution of the per-token abs-max (what dynamic per-token
  quantization adapts to), as count / mean / max and fixed quantiles of the rows seen;
* :class:`HistogramObserver`: a histogram of |x| over a range that doubles when exceeded
  (bins are merged in pairs), for percentile clipping (NaN/±Inf input is a NonFiniteError: an infinite maximum would
  double the range without end);
* :class:`SampleObserver`: a bounded, deterministic sample of rows (every k-th row up to a cap),
  for searches that need real inputs (α and clip-ratio grids).
"""

from __future__ import annotations

import torch

from qcompile.quant.finite import check_finite


class AbsMaxObserver:
    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        m = x2.abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.rows += x2.shape[0]

    @property
    def tensor_absmax(self) -> float:
        return float(self.value().max())

    def value(self) -> torch.Tensor:
        if self.absmax is None:
            raise ValueError("observer saw no data")
        return self.absmax


class TokenStatsObserver:
    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(self, keep: int = 65536) -> None:
        self.keep = keep
        self.values: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=1).to(torch.float32)
        self.count += m.numel()
        if sum(v.numel() for v in self.values) < self.keep:
            self.values.append(m)

    def summary(self) -> dict[str, float]:
        v = torch.cat(self.values)[: self.keep]
        out = {"tokens": float(self.count), "mean": float(v.mean()), "max": float(v.max())}
        for q in self.QUANTILES:
            out[f"q{q}"] = float(torch.quantile(v, q))
        return out


class HistogramObserver:
    def __init__(self, bins: int = 2048) -> None:
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.upper = 0.0

    def update(self, x: torch.Tensor) -> None:
        check_finite(x, "the activations a histogram observer saw")
        a = x.detach().abs().reshape(-1).to(torch.float32)
        top = float(a.max()) if a.numel() else 0.0
        if self.upper == 0.0:
            self.upper = top if top > 0 else 1.0
        while top > self.upper:  # double the range: merge bins in pairs into the lower half
            merged = self.hist.view(-1, 2).sum(dim=1)
            self.hist = torch.cat([merged, torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.upper *= 2
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.upper).to(torch.float64)

    def percentile(self, p: float) -> float:
        """Upper edge of the bin where the cumulative share of |x| reaches ``p`` (0 < p ≤ 1)."""
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)))
        return (min(i, self.bins - 1) + 1) * self.upper / self.bins


class SampleObserver:
    """Keeps every ``stride``-th row seen, up to ``cap`` rows (deterministic)."""

    def __init__(self, cap: int = 1024, stride: int = 4) -> None:
        self.cap, self.stride = cap, stride
        self.rows: list[torch.Tensor] = []
        self.seen = 0
        self.kept = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        start = (-self.seen) % self.stride
        pick = x2[start :: self.stride][: self.cap - self.kept]
        self.seen += x2.shape[0]
        if pick.numel():
            self.rows.append(pick.clone())
            self.kept += pick.shape[0]

    def value(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("observer saw no data")
        return torch.cat(self.rows)
