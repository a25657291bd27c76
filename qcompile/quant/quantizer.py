"""Uniform quantizers: the one library every pass, reference op and kernel oracle uses.

Two families, both on the grids of :func:`qcompile.quant.spec.levels` (symmetric
``[-(2^(b-1)-1), 2^(b-1)-1]`` with ``s = absmax / qmax``; asymmetric ``[0, 2^b-1]`` with a float
offset, as GGUF Q4_1), rounding with ``torch.round`` (half to even), and a block of zeros getting
scale 1 (codes 0), never a division by zero. Non-finite values are never made plausible: a weight,
calibration tensor or static scale holding NaN/±Inf, or a computed scale that overflows float32, is a
:class:`~qcompile.errors.NonFiniteError` (a ``ValueError``); the run-time activation quantizers
(used by the reference ops) do not raise but propagate NaN into the scale, so a NaN input gives a
NaN output as in float, never a zeroed row:

* **Round-to-nearest in the kernels' layouts** (what the ops store and compute):
  :func:`quantize_weight_per_channel` (W8 ``[N, K]`` → int8 + ``[N]`` scales),
  :func:`quantize_weight_groups` / :func:`dequantize_weight_groups` (any width, groups of
  consecutive input channels, a shorter last group when the group size does not divide K),
  :func:`quantize_per_token` and :func:`quantize_activation_groups` (dynamic symmetric
  activations), :func:`activation_blocks` (the activation codes of an integer linear, per token
  or per token group, laid out in the weight's blocks: the reference ops' and the sensitivity
  analysis' one quantizer), and the fake-quantizers :func:`fake_quantize_weight` /
  :func:`fake_quantize_activation` driven by a :class:`~qcompile.quant.spec.QuantSpec`.
* **General blocked quantizers** (calibration and searches): a tensor ``x`` is split into *blocks*
  that share one scale: ``per_tensor``: one block; ``per_channel``: one block per row of a weight
  ``[N, K]`` (output channel), or, for an activation ``[..., K]``, one block per input channel
  (:func:`per_channel_activation`, the *static* per-channel step of MergeQuant/SmoothQuant
  calibration); ``per_token``: one block per row of an activation; ``per_group``: ``group_size``
  consecutive elements along the last axis of each row (the group size must divide the axis
  unless ``partial_last_group`` is set; the tail is zero-padded). Asymmetric:
  ``s = clip·(max-min) / (2^b-1)``, ``m = clip·min`` (the range shrinks toward zero). *Static*
  quantization takes the scale from calibration (``scale=`` argument); *dynamic* quantization
  computes it from ``x`` itself. :func:`search_clip` picks a clip ratio by grid search on the
  output error of a linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qcompile.errors import PlanError
from qcompile.quant.finite import check_finite, check_scale
from qcompile.quant.spec import Granularity, QuantSpec, levels


@dataclass(frozen=True)
class Quantized:
    """Integer codes (int16 so every width and sign convention fits) and the block parameters,
    broadcastable against ``x`` after :func:`blocks_view`."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    symmetric: bool
    group_size: int | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def _grouped(x: torch.Tensor, group_size: int, partial_last_group: bool) -> torch.Tensor:
    """``x[..., K]`` → ``[..., G, group_size]`` (zero-padded tail when allowed)."""
    k = x.shape[-1]
    if group_size <= 0:
        raise PlanError(f"group_size must be positive, got {group_size}")
    if k % group_size:
        if not partial_last_group:
            divisors = [d for d in range(1, k + 1) if k % d == 0][-4:]
            raise PlanError(f"group_size {group_size} does not divide the {k} channels; divisors include {divisors}")
        x = torch.nn.functional.pad(x, (0, group_size - k % group_size))
    return x.reshape(*x.shape[:-1], -1, group_size)


def blocks_view(
    x: torch.Tensor, granularity: Granularity, group_size: int | None = None, partial_last_group: bool = False
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` reshaped so that reducing over the returned dims gives one value per block."""
    if granularity is Granularity.PER_TENSOR:
        return x, tuple(range(x.dim()))
    if granularity is Granularity.PER_TOKEN:
        return x, (x.dim() - 1,)
    if granularity is Granularity.PER_CHANNEL:
        # weights [N, K]: one block per row; activations [..., K] use per_channel_activation()
        return x, tuple(range(1, x.dim()))
    if group_size is None:
        raise PlanError("per_group quantization needs a group_size")
    g = _grouped(x, group_size, partial_last_group)
    return g, (g.dim() - 1,)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) of the grid covering ``[lo, hi]`` shrunk by ``clip``; NonFiniteError when
    the range is not finite or the scale overflows."""
    check_finite(lo, "the minimum of a block being quantized")
    check_finite(hi, "the maximum of a block being quantized")
    qmin, qmax = levels(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs()) * clip
        scale = absmax / qmax
        scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
        check_scale(scale, "a block")
        return scale, None
    lo_c, hi_c = lo * clip, hi * clip
    scale = (hi_c - lo_c) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    check_scale(scale, "a block")
    return scale, lo_c


def quantize(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity,
    *,
    symmetric: bool = True,
    group_size: int | None = None,
    partial_last_group: bool = False,
    clip: float | torch.Tensor = 1.0,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> Quantized:
    """Quantize ``x``; dynamic (range from ``x``) unless a static ``scale`` (and ``offset``) is given.

    Codes have the blocked shape (``[..., G, group_size]`` for per_group), scales keep the reduced
    dims (size 1) so ``codes * scale (+ offset)`` broadcasts.
    """
    check_finite(x, f"the tensor being quantized {list(x.shape)}")
    xb, dims = blocks_view(x.to(torch.float32), granularity, group_size, partial_last_group)
    if scale is not None:
        check_finite(scale, "the static scale")
        if offset is not None:
            check_finite(offset, "the static offset")
    if scale is None:
        lo, hi = xb.amin(dim=dims, keepdim=True), xb.amax(dim=dims, keepdim=True)
        scale, offset = params_from_range(lo, hi, bits, symmetric, clip)
    elif not symmetric and offset is None:
        raise ValueError("static asymmetric quantization needs an offset")
    qmin, qmax = levels(bits, symmetric)
    shifted = xb if offset is None else xb - offset
    codes = torch.clamp(torch.round(shifted / scale), qmin, qmax).to(torch.int16)
    return Quantized(
        codes, scale, offset, bits, symmetric, group_size if granularity is Granularity.PER_GROUP else None
    )


def dequantize(q: Quantized) -> torch.Tensor:
    x = q.codes.to(torch.float32) * q.scale
    return x if q.offset is None else x + q.offset


def fake_quantize(x: torch.Tensor, bits: int, granularity: Granularity, **kw: object) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s shape and dtype."""
    q = quantize(x, bits, granularity, **kw)  # type: ignore[arg-type]
    y = dequantize(q)
    if granularity is Granularity.PER_GROUP:
        y = y.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return y.to(x.dtype)


def per_channel_activation(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric per-input-channel codes ``clamp(round(x / step))`` of ``x[..., K]`` (``step[K]``)."""
    qmin, qmax = levels(bits, True)
    return torch.clamp(torch.round(x.to(torch.float32) / step), qmin, qmax)


def steps_from_absmax(absmax: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Symmetric steps ``clip·absmax / qmax`` (1 where the channel was always zero)."""
    scale, _ = params_from_range(-absmax, absmax, bits, True, clip)
    return scale


DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00 ... 0.50


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    symmetric: bool = True,
    partial_last_group: bool = True,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> torch.Tensor:
    """Per (row, group) clip ratio minimizing ``‖x_g (w_g − ŵ_g)ᵀ‖²`` over ``grid``.

    ``weight[N, K]``, ``x[T, K]`` calibration inputs. Returns ratios ``[N, G, 1]`` to pass as
    ``clip=`` to :func:`quantize` with ``per_group`` (``group_size=None``: one group = the row).
    The error is measured group by group (the cross-group terms are ignored), as AWQ does.
    """
    check_finite(weight, f"the weight {list(weight.shape)}")
    check_finite(x, f"the calibration inputs {list(x.shape)}")
    gs = group_size or weight.shape[1]
    w = _grouped(weight.to(torch.float32), gs, partial_last_group)  # [N, G, gs]
    xg = _grouped(x.to(torch.float32), gs, partial_last_group).permute(1, 0, 2)  # [G, T, gs]
    best_err = torch.full(w.shape[:2], float("inf"))
    best = torch.ones(w.shape[:2])
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    for r in grid:
        scale, offset = params_from_range(lo, hi, bits, symmetric, r)
        qmin, qmax = levels(bits, symmetric)
        shifted = w if offset is None else w - offset
        deq = torch.clamp(torch.round(shifted / scale), qmin, qmax) * scale
        if offset is not None:
            deq = deq + offset
        diff = (w - deq).permute(1, 2, 0)  # [G, gs, N]
        err = torch.bmm(xg, diff).pow(2).sum(dim=1).t()  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best[..., None]


# ---- round-to-nearest in the kernels' layouts ---------------------------------------------


def code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """How one-per-byte codes are stored: int8, except 8-bit asymmetric codes ([0, 255]) in uint8."""
    return torch.int8 if symmetric or bits < 8 else torch.uint8


def _scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``absmax / qmax``, 1 for an all-zero block; a NaN block keeps a NaN scale (never 1: that would
    turn it into zeros), so a NaN activation gives a NaN output."""
    scale = absmax / qmax
    return torch.where(absmax == 0, torch.ones_like(scale), scale)


def _check_weight(weight: torch.Tensor) -> None:
    check_finite(
        weight,
        f"the weight {list(weight.shape)} being quantized",
        "fix the model's weights (or set the plan's nonfinite: zero to replace them by 0)",
    )


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight[N, K]`` → (int8 codes ``[N, K]``, float32 scales ``[N]``); ``w ≈ q * s[:, None]``."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    _check_weight(weight)
    qmin, qmax = levels(bits, True)
    w = weight.detach().to(torch.float32)
    scale = _scale(w.abs().amax(dim=1), qmax)
    check_scale(scale, "a weight row")
    q = torch.clamp(torch.round(w / scale[:, None]), qmin, qmax).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[..., K]`` → (int8 codes ``[..., K]``, float32 scales ``[..., 1]``), one scale per row."""
    qmin, qmax = levels(bits, True)
    xf = x.to(torch.float32)
    scale = _scale(xf.abs().amax(dim=-1, keepdim=True), qmax)
    q = torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8)
    return q, scale


# ---- grouped weights (any bit-width, symmetric or asymmetric) -------------------------------


def num_groups(k: int, group_size: int) -> int:
    """Groups along K of ``group_size`` (the last one shorter when it does not divide K)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return -(-k // group_size)


def _pad_k(t: torch.Tensor, group_size: int) -> torch.Tensor:
    k = t.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize_weight_groups(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight[N, K]`` → (codes int8 ``[N, K]``, scale f32 ``[N, G]``, offset f32 ``[N, G]`` or None).

    Groups are ``group_size`` consecutive input channels of a row (a shorter last group when
    ``group_size`` does not divide K). Symmetric: ``w ≈ q·s`` with q in ``[-(2^(b-1)-1), 2^(b-1)-1]``.
    Asymmetric (min/max, float offset, as GGUF Q4_1): ``w ≈ q·s + m`` with q in ``[0, 2^b - 1]``,
    ``s = (max - min) / (2^b - 1)``, ``m = min``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    _check_weight(weight)
    n, k = weight.shape
    g = num_groups(k, group_size)
    w = weight.detach().to(torch.float32)
    wp = _pad_k(w, group_size).view(n, g, group_size)
    valid = _pad_k(torch.ones(1, k), group_size).view(1, g, group_size).bool()
    if symmetric:
        _, qmax = levels(bits, True)
        absmax = wp.abs().amax(dim=-1)
        scale = _scale(absmax, qmax)
        q = torch.clamp(torch.round(wp / scale[..., None]), -qmax, qmax)
        offset = None
    else:
        levels_ = levels(bits, False)[1]
        lo = torch.where(valid, wp, torch.full_like(wp, float("inf"))).amin(dim=-1)
        hi = torch.where(valid, wp, torch.full_like(wp, float("-inf"))).amax(dim=-1)
        scale = _scale(hi - lo, levels_)
        q = torch.clamp(torch.round((wp - lo[..., None]) / scale[..., None]), 0, levels_)
        offset = lo
    check_scale(scale, "a weight group")
    codes = q.reshape(n, g * group_size)[:, :k].to(code_dtype(bits, symmetric))
    return codes, scale, offset


def dequantize_weight_groups(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The float32 weight ``q·s (+ m)`` that :func:`quantize_weight_groups` encodes."""
    n, k = codes.shape
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    w = codes.to(torch.float32) * s
    if offset is not None:
        w = w + offset.repeat_interleave(group_size, dim=1)[:, :k]
    return w


def quantize_activation_groups(x: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of ``x[M, K]`` per token (``group_size=None``) or per
    token-group → (codes int8 ``[M, G, gs]`` zero-padded, scales f32 ``[M, G]``)."""
    m, k = x.shape
    gs = k if group_size is None else group_size
    g = num_groups(k, gs)
    _, qmax = levels(bits, True)
    xp = _pad_k(x.to(torch.float32), gs).view(m, g, gs)
    scale = _scale(xp.abs().amax(dim=-1), qmax)
    q = torch.clamp(torch.round(xp / scale[..., None]), -qmax, qmax).to(torch.int8)
    return q, scale


# ---- the oracles' shared quantizers: activation blocks and fake quantization by spec -------------


def activation_blocks(x2: torch.Tensor, bits: int, act_group: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation codes of an integer linear over ``x2[M, K]``, laid out in blocks of ``block``
    input channels (the weight's group): ``act_group == 0``: one dynamic symmetric scale per token,
    repeated for every block; else per token group of ``act_group`` (== ``block``). Returns
    ``(codes int8 [M, G, block]`` zero-padded past K, ``scales f32 [M, G])``. Every reference op
    and the sensitivity analysis quantize activations with this one function."""
    k = x2.shape[-1]
    g = num_groups(k, block)
    if act_group == 0:
        qx, sx = quantize_activation_groups(x2, bits, None)
        qx = torch.nn.functional.pad(qx.view(-1, k), (0, g * block - k)).view(-1, g, block)
        return qx, sx.expand(-1, g)
    return quantize_activation_groups(x2, bits, block)


def _act_group(spec: QuantSpec, k: int) -> int:
    return spec.block(k) if spec.granularity is Granularity.PER_GROUP else 0


def fake_quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``x[..., K]`` exactly as the integer linear ops quantize activations
    (dynamic symmetric, per token or per token group)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float32)
    block = spec.block(k)
    q, s = activation_blocks(x2, spec.bits, _act_group(spec, k), block)
    return (q.to(torch.float32) * s[..., None]).reshape(x2.shape[0], -1)[:, :k].reshape(x.shape)


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The float weight that round-to-nearest quantization by ``spec`` encodes (per channel or per group)."""
    group = spec.block(weight.shape[1])
    codes, scale, offset = quantize_weight_groups(weight, spec.bits, group, spec.symmetric)
    return dequantize_weight_groups(codes, scale, offset, group)
