"""``LinearRecipe``: how one linear layer's weight is stored for qcompile's kernels, written once.

A recipe is the weight format (``f32``, ``i8``, ``u2``, ``u3``, ``u4``, ``i6``, ``i4``: see :mod:`.kernels.linear`), the
weight group along K, the activation bits and grouping, and the zero point / float offset, folded
into one per-(output, group) term ``c = offset − zero·scale`` (weight-only formats add ``c·Σx``;
with integer activations, asymmetric ``u4`` adds ``c·sx·Σqx``: llama.cpp's Q4_1 × Q8_1).
The lowering (:mod:`.converters` and the target's rules), the kernel selection
(:func:`.select.measure_w6`) and the benchmark kernels (:mod:`.kernels.bench`) build their kernel
specs and repack their tensors through it, so the three cannot disagree on a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.codegen.tvm.kernels.bitserial import BitSerial, pack_plane_scales, pack_weight_planes
from qcompile.codegen.tvm.kernels.linear import UNSIGNED, LinearKernel, pack_groups, pack_weight, padded


class NoFormat(ValueError):
    """Quantized weights that no kernel format stores (the lowering declines such a node)."""


@dataclass(frozen=True)
class LinearRecipe:
    """An N×K linear layer's weight format and activations (sizes unpadded: kernels pad)."""

    n: int
    k: int
    wfmt: str  # "f32" | "i8" | "u2" | "u3" | "u4" | "i6" | "i4"
    group: int  # weight group along K; == k: one scale per output channel
    act_bits: int = 0  # 0: fp32 activations
    act_grouped: bool = False  # activation scales per group of ``group`` (else one per token)
    zero: int = 0  # stored code = code + zero (symmetric u2: 2, u3: 4, u4: 8)
    offset: bool = False  # asymmetric weights: a float offset per (output, group)

    @classmethod
    def dense(cls, n: int, k: int) -> LinearRecipe:
        """A float weight (the fp32 kernel, one group)."""
        return cls(n, k, "f32", k)

    @classmethod
    def w8a8(cls, n: int, k: int) -> LinearRecipe:
        """int8 codes with one scale per output channel, int8 activations per token."""
        return cls(n, k, "i8", k, act_bits=8)

    @classmethod
    def codes(
        cls, n: int, k: int, bits: int, group: int, act_bits: int, act_grouped: bool, offset: bool
    ) -> LinearRecipe:
        """Integer codes of ``bits`` in groups of ``group`` (a float ``offset`` when asymmetric), with
        ``act_bits``-bit activations (0: fp32): ``i6`` for 6 bits; with fp32 activations ``u2`` for
        2 bits, ``u3`` for 3 bits and ``u4`` for 4 bits (and fewer); with integer activations ``i4``
        (signed nibbles) for symmetric 4 bits and fewer, ``u4`` (unsigned nibbles and the offset term)
        for asymmetric ones; ``i8`` otherwise. :class:`NoFormat` when no kernel stores them."""
        if bits > 8:
            raise NoFormat(f"{bits}-bit weights have no kernel")
        if offset and bits > 4:
            raise NoFormat("asymmetric codes above 4 bits have no kernel")
        if act_bits and offset:
            wfmt = "u4"
        elif act_bits:
            wfmt = "i6" if bits == 6 else ("i4" if bits <= 4 else "i8")
        else:
            wfmt = {2: "u2", 3: "u3"}.get(bits, "u4") if bits <= 4 else ("i6" if bits == 6 else "i8")
        zero = 0 if (offset or wfmt not in UNSIGNED) else {"u2": 2, "u3": 4, "u4": 8}[wfmt]
        return cls(n, k, wfmt, group, act_bits, act_grouped, zero, offset)

    @property
    def scaled(self) -> bool:
        """Integer codes carry per-(output, group) scales; float weights do not."""
        return self.wfmt != "f32"

    @property
    def zero_term(self) -> bool:
        """Whether the kernel adds ``c[n, g]·Σx`` (a zero point or a float offset)."""
        return self.offset or self.zero != 0

    # ---- the CPU template (kernels/linear.py) -------------------------------------------------
    def kernel(self, m: int | None, bias: bool = False) -> LinearKernel:
        """The lane-blocked kernel for ``m`` rows (None: dynamic); ValueError when it has none."""
        n_p, k_p, group = padded(self.n, self.k, self.group)
        act_group = group if self.act_grouped else 0
        return LinearKernel(n_p, k_p, self.wfmt, group, self.act_bits, act_group, self.zero_term, bias, m)

    def cterm(self, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """The per-(output, group) term ``offset − zero·scale`` (``[N, G]``)."""
        return (offset.float() if offset is not None else 0) - self.zero * scale.float()

    def pack_weight(self, spec: LinearKernel, codes: torch.Tensor) -> list[torch.Tensor]:
        """The kernel's weight tensors from ``codes[N, K]`` (the float weight for ``f32``)."""
        return pack_weight(spec, codes, self.zero)

    def pack_groups(self, spec: LinearKernel, t: torch.Tensor) -> torch.Tensor:
        """Per-(output, group) values ``[N, G]`` (scales, the zero term) in the kernel's layout."""
        return pack_groups(spec, t)

    def pack(
        self,
        spec: LinearKernel,
        codes: torch.Tensor,
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Every weight-side argument of ``spec``'s kernel, in order: weights, scales, zero term."""
        out = self.pack_weight(spec, codes)
        if self.scaled:
            assert scale is not None, "integer codes need their scales"
            out.append(self.pack_groups(spec, scale))
        if self.zero_term:
            assert scale is not None
            out.append(self.pack_groups(spec, self.cterm(scale, offset)))
        return out

    # ---- the bit-serial CPU kernel (kernels/bitserial.py) -------------------------------------
    def bitserial(self, m: int | None) -> BitSerial | None:
        """The bit-serial kernel computing the same integer products as :meth:`kernel`, if any."""
        try:
            spec = self.kernel(m)
        except ValueError:
            return None
        return bitserial_spec(spec)

    def pack_planes(self, bs: BitSerial, codes: torch.Tensor) -> torch.Tensor:
        """The bit-serial kernel's weight bit planes."""
        return pack_weight_planes(bs, codes)

    def pack_plane_scales(self, bs: BitSerial, scale: torch.Tensor) -> torch.Tensor:
        """The bit-serial kernel's scales, blocked like its planes."""
        return pack_plane_scales(bs, scale)

    def pack_bitserial(self, bs: BitSerial, codes: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
        """Every weight-side argument of the bit-serial kernel: planes, then scales."""
        return [self.pack_planes(bs, codes), self.pack_plane_scales(bs, scale)]


def bitserial_spec(spec: LinearKernel) -> BitSerial | None:
    """The bit-serial kernel computing the same integer products as ``spec``, if one exists."""
    if spec.wfmt != "i6" or not spec.act_bits or spec.group % 32:
        return None
    n_p = -(-spec.n // 8) * 8
    return BitSerial(n_p, spec.k, spec.group, 6, spec.act_bits, spec.act_group, spec.m)
