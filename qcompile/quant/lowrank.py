"""Low-rank factors of projection weights (XQuant's latent caches for GQA models)."""

from __future__ import annotations

import torch

from qcompile.quant.finite import check_finite


def latent_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Uᵀ [r, D], (Σ·Bᵀ)ᵀ [N, r])`` with ``W = (Σ·Bᵀ)ᵀ · Uᵀ`` for ``weight[N, D]``, from a float64
    SVD of ``Wᵀ = U·Σ·Bᵀ`` at full rank ``r = min(N, D)``, returned in the weight's dtype. A
    projection ``x·Wᵀ`` becomes ``(x·U)·(Σ·Bᵀ)``: caching the ``r``-wide latent ``x·U`` instead of ``x``."""
    check_finite(weight, f"the projection weight {list(weight.shape)} being factored (SVD)")
    wt = weight.detach().to(torch.float64).t()  # [D, N]
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)  # rank = N when N <= D
    r = min(weight.shape)
    u_t = u[:, :r].t().contiguous()  # [r, D]
    sb_t = (s[:r, None] * vh[:r]).t().contiguous()  # [N, r]
    return u_t.to(weight.dtype), sb_t.to(weight.dtype)
