"""Shapes, limits and weight layouts of the CUDA kernels (:mod:`.cuda`), in plain torch: this
module imports neither TVM nor the rest of qcompile, so ``benchmarks/gpu_check.py`` can pack
weights and compute references on a GPU machine that has only torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KS = 4  # warps per block, splitting K
KINDS = ("s8", "u6", "b1", "f16")
MMA = {  # kind -> (rows per tile, K per MMA step, PTX)
    "s8": (16, 32, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"),
    "u6": (16, 32, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"),
    "b1": (8, 128, "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc"),
    "f16": (16, 16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
}
WORDS = {"s8": 4, "u6": 3, "f16": 1}  # uint32 weight words per lane per MMA step


class Uncovered(ValueError):
    """The shape or format has no CUDA tensor-core kernel (the caller falls back to a generic one)."""


@dataclass(frozen=True)
class CudaLinear:
    """One kernel instance for an N×K weight (N, K already padded to the tile and the group)."""

    kind: str
    n: int
    k: int
    group: int  # weight scale group (== k: per output channel)
    act_bits: int  # 0: fp32 activations (f16 kind); else 6 or 8
    act_group: int  # 0: one activation scale per token; else == group
    bias: bool
    zero_term: bool = False  # f16: w = u·s + c
    tokens: int = 8  # tokens per block (b1: any; others: a multiple of 8, one n8 MMA tile each)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown CUDA kernel kind {self.kind!r}; kinds: {KINDS}")
        rows, kstep, _ = MMA[self.kind]
        if self.n % rows or self.k % kstep:
            raise Uncovered(f"{self.kind} needs N % {rows} == 0 and K % {kstep} == 0, got {self.n}×{self.k}")
        if self.group % kstep or self.k % self.group:
            raise Uncovered(
                f"{self.kind} needs groups that are a multiple of {kstep} dividing K, got group {self.group}"
            )
        if self.act_group not in (0, self.group):
            raise Uncovered("activation groups must equal the weight groups")
        if (self.kind == "f16") != (self.act_bits == 0):
            raise Uncovered(f"{self.kind} takes {'fp32' if self.kind == 'f16' else 'integer'} activations")
        if self.act_bits not in (0, 6, 8) or (self.kind == "s8" and self.act_bits != 8):
            raise Uncovered(f"no {self.kind} kernel for {self.act_bits}-bit activations")
        if self.tokens <= 0 or (self.kind != "b1" and self.tokens % 8):
            raise ValueError("tokens per block must be positive (a multiple of 8 for the m16n8 kernels)")

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def chunk(self) -> int:
        """K per exact int32 partial: the group, or for one group K/KS rounded to the MMA step."""
        _, kstep, _ = MMA[self.kind]
        if self.groups > 1:
            return self.group
        steps = self.k // kstep
        return kstep * max(1, -(-steps // KS))

    @property
    def name(self) -> str:
        return (
            f"qc_cuda_{self.kind}_n{self.n}_k{self.k}_g{self.group}_a{self.act_bits}"
            f"{'g' if self.act_group else 't'}{'_b' if self.bias else ''}"
            f"{'_z' if self.zero_term else ''}_t{self.tokens}"
        )

    def weight_shapes(self) -> list[tuple[tuple[int, ...], str]]:
        rows, kstep, _ = MMA[self.kind]
        if self.kind == "b1":
            return [((self.n // 8, self.k // 128, 6, 32), "uint32")]
        return [((self.n // rows, self.k // kstep, 32, WORDS[self.kind]), "uint32")]

    def act_shape(self) -> tuple[tuple[int | str, ...], str]:
        """Shape of the activation operand (``"m"`` is the token count)."""
        if self.kind == "b1":
            return ("m", self.k // 128, 8, 4), "uint32"
        if self.kind == "f16":
            return ("m", self.k), "float32"
        return ("m", self.k), "int8"


@dataclass(frozen=True)
class CudaQuant:
    """Per-token (``group == 0``) or per-group symmetric ``bits``-bit codes of ``x[M, K]``; with
    ``planes`` also the ``b1`` kernel's bit planes; with ``norm`` the input is first RMS-normalized
    (``x · rsqrt(mean(x²) + eps) · weight``)."""

    k: int
    bits: int
    group: int
    planes: bool = False
    norm: bool = False
    eps: float = 1e-6
    valid: int = 0  # norm: the row's true length when K is zero-padded (the mean divides by it)

    def __post_init__(self) -> None:
        if self.k % 128 or (self.group and (self.group % 128 or self.k % self.group)):
            raise Uncovered(
                f"CUDA activation quantization needs K and groups in multiples of 128, got K={self.k}, "
                f"group={self.group}"
            )
        if self.bits not in (6, 8):
            raise Uncovered(f"no {self.bits}-bit activation codes")

    @property
    def groups(self) -> int:
        return self.k // self.group if self.group else 1

    @property
    def name(self) -> str:
        norm = f"_norm{self.eps:g}".replace("-", "m").replace(".", "p") + (f"v{self.valid}" if self.valid else "")
        planes = "_planes" if self.planes else ""
        return f"qc_cuda_quant_k{self.k}_b{self.bits}_g{self.group}{planes}{norm if self.norm else ''}"


# ---- weight repacking (torch, at build time) --------------------------------------------------


def _fragment_index(kind: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(row, k) within one (tile, MMA step) of every A-fragment element, shaped [32 lanes, regs, elems]
    in register order, per the PTX ISA's "Matrix Fragments" tables (groupID = lane/4,
    threadID_in_group = lane%4)."""
    lane = torch.arange(32, device=device)[:, None, None]
    gid, tig = lane // 4, lane % 4
    if kind == "b1":  # m8n8k128 .b1: one register of 32 bits, row gid, k = tig·32 + bit
        e = torch.arange(32, device=device)[None, None, :]
        return (gid + 0 * e), tig * 32 + e
    if kind == "f16":  # m16n8k16 .f16: regs (r) of 2 halves (h); rows gid(+8 for odd r), k = tig·2 + h (+8 for r ≥ 2)
        r, h = torch.arange(4, device=device)[None, :, None], torch.arange(2, device=device)[None, None, :]
        return gid + (r % 2) * 8 + 0 * h, tig * 2 + h + (r // 2) * 8
    # m16n8k32 .s8: regs of 4 bytes; rows gid(+8 for odd r), k = tig·4 + b (+16 for r ≥ 2)
    r, b = torch.arange(4, device=device)[None, :, None], torch.arange(4, device=device)[None, None, :]
    return gid + (r % 2) * 8 + 0 * b, tig * 4 + b + (r // 2) * 16


def _fragments(spec: CudaLinear, codes: torch.Tensor) -> torch.Tensor:
    """``codes[N, K]`` (int64) → ``[tiles, steps, 32, regs, elems]`` in fragment order."""
    rows, kstep, _ = MMA[spec.kind]
    row, kk = _fragment_index("s8" if spec.kind == "u6" else spec.kind, codes.device)
    tiles, steps = spec.n // rows, spec.k // kstep
    t = torch.arange(tiles, device=codes.device)[:, None, None, None, None]
    s = torch.arange(steps, device=codes.device)[None, :, None, None, None]
    return codes[t * rows + row, s * kstep + kk]


def _words(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian: ``[..., 32/width]`` fields of ``width`` bits → ``[...]`` uint32 words (as int64)."""
    shifts = torch.arange(bits.shape[-1], device=bits.device) * width
    return (bits << shifts).sum(-1)


def _as_u32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) → 32-bit words: a uint32 tensor on the CPU (what TVM's kernels
    declare); on other devices, whose uint32 support in torch is partial, the same bits as int32."""
    words = words.to(torch.int64)
    if words.device.type == "cpu":
        return words.to(torch.uint32)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_cuda_weight(spec: CudaLinear, codes: torch.Tensor) -> torch.Tensor:
    """The kernel's weight tensor from integer ``codes[N, K]`` (already padded with zeros):
    signed codes for ``s8``/``u6``/``b1``, unsigned ``u = code + zero`` for ``f16``. Runs on the
    codes' device; large weights are packed in slices of output tiles to bound the index tensors."""
    rows = MMA[spec.kind][0]
    tile_rows = max(rows, (1 << 24) // max(1, spec.k) // rows * rows)
    if spec.n > tile_rows:
        parts = [
            pack_cuda_weight(replace(spec, n=min(tile_rows, spec.n - i)), codes[i : i + tile_rows])
            for i in range(0, spec.n, tile_rows)
        ]
        return torch.cat(parts)
    c = codes.to(torch.int64)
    if spec.kind == "b1":
        f = _fragments(spec, c)[..., 0, :]  # [tiles, steps, 32, 32 bits]
        planes = torch.stack([_words((f >> p) & 1, 1) for p in range(6)], dim=2)  # [tiles, steps, 6, 32]
        return _as_u32(planes)
    f = _fragments(spec, c)
    if spec.kind == "s8":
        return _as_u32(_words(f & 0xFF, 8))  # [tiles, steps, 32, 4]
    if spec.kind == "f16":
        return _as_u32(_words(f.flatten(-2) & 0xF, 4)[..., None])  # [tiles, steps, 32, 1]
    u = f + 32  # u6: 0..63
    lo, hi = u & 15, u >> 4  # [tiles, steps, 32, 4 regs, 4 bytes]
    w0 = _words(lo[..., 0, :] | (lo[..., 1, :] << 4), 8)
    w1 = _words(lo[..., 2, :] | (lo[..., 3, :] << 4), 8)
    w2 = _words(sum(hi[..., r, :] << (2 * r) for r in range(4)), 8)
    return _as_u32(torch.stack([w0, w1, w2], dim=-1))


def act_planes_reference(codes: torch.Tensor) -> torch.Tensor:
    """``codes[M, K]`` → the ``b1`` kernel's activation planes ``[M, K/128, 8, 4]`` (word ``(p, e)`` bit
    ``l`` = bit ``p`` of the code at ``k = e·32 + l`` of the 128-wide step)."""
    m, k = codes.shape
    c = codes.to(torch.int64).reshape(m, k // 128, 1, 4, 32)
    bits = (c >> torch.arange(8, device=c.device)[None, None, :, None, None]) & 1
    return _as_u32(_words(bits, 1))


def unpack_cuda_weight(spec: CudaLinear, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_cuda_weight`: the codes ``[N, K]`` (int64) the kernel will read."""
    rows, kstep, _ = MMA[spec.kind]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if spec.kind == "b1":
        bits = (w[..., None] >> torch.arange(32)) & 1  # [tiles, steps, 6, 32 lanes, 32 bits]
        value = sum(bits[:, :, p] << p for p in range(6))
        frag = (value - ((value >> 5) << 6))[..., None, :]  # sign plane 5: [tiles, steps, 32, 1, 32]
    elif spec.kind == "s8":
        b = (w[..., None] >> (8 * torch.arange(4))) & 0xFF
        frag = b - ((b >> 7) << 8)
    elif spec.kind == "f16":
        frag = ((w[..., 0, None] >> (4 * torch.arange(8))) & 0xF).view(*w.shape[:-1], 4, 2)
    else:  # u6: the kernel's shift/mask/byte-subtract, in torch
        by = lambda word: (word[..., None] >> (8 * torch.arange(4))) & 0xFF  # noqa: E731
        lo0, lo1, hi = by(w[..., 0]), by(w[..., 1]), by(w[..., 2])
        regs = [((lo0 if r < 2 else lo1) >> (4 * (r % 2)) & 15) | (((hi >> (2 * r)) & 3) << 4) for r in range(4)]
        frag = torch.stack(regs, dim=-2) - 32
    row, kk = _fragment_index("s8" if spec.kind == "u6" else spec.kind)
    tiles, steps = spec.n // rows, spec.k // kstep
    codes = torch.zeros(spec.n, spec.k, dtype=torch.int64)
    t = torch.arange(tiles)[:, None, None, None, None]
    s = torch.arange(steps)[None, :, None, None, None]
    codes[(t * rows + row).expand_as(frag), (s * kstep + kk).expand_as(frag)] = frag
    return codes


def planes_to_codes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`act_planes_reference` (two's complement over 8 planes)."""
    w = planes.to(torch.int64) & 0xFFFFFFFF  # [M, S, 8, 4]
    bits = (w[..., None] >> torch.arange(32)) & 1  # [M, S, 8, 4, 32]
    value = sum(bits[:, :, p] << p for p in range(8))  # [M, S, 4, 32]
    return (value - ((value >> 7) << 8)).reshape(planes.shape[0], -1)
