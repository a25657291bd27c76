"""``qcompile::winograd_conv2d``: a 3×3, stride-1, dilation-1 convolution (dense, or depthwise) by Winograd F(m, 3).

``winograd_conv2d(x, U, AT, BT, bias, m, padding, fp16)`` with ``U = G g Gᵀ`` pre-transformed at
compile time (``[α, α, C_out, C_in]``), ``AT`` (m × α) and ``BT`` (α × α) the transforms:

1. zero-pad ``x`` by ``padding``, then on the bottom/right up to whole tiles (edge tiles);
2. overlapping α×α input tiles with stride m; ``V = Bᵀ d B`` per tile and channel;
3. per transform point (i, j) one GEMM over input channels: ``M = U[i, j] @ V[i, j]`` (depthwise,
   recognised by ``U`` of shape ``[α, α, C, 1]`` with C > 1 input channels: an elementwise product);
4. ``Y = Aᵀ M A`` per tile; crop to the true output size; add the bias (fp32).

``fp16=True`` runs it as a tensor-core GPU kernel would: ``x``, the transform matrices, ``U``, ``V``,
``M`` and ``Y`` are stored in fp16; every matrix product multiplies fp16 operands, accumulates in
fp32 and rounds its result to fp16. ``fp16=False`` does the same in fp32.
"""

from __future__ import annotations

import torch


def _mm(a: torch.Tensor, b: torch.Tensor, fp16: bool) -> torch.Tensor:
    if not fp16:
        return a @ b
    return (a.to(torch.float32) @ b.to(torch.float32)).to(torch.float16)


@torch.library.custom_op("qcompile::winograd_conv2d", mutates_args=())
def winograd_conv2d(
    x: torch.Tensor,
    U: torch.Tensor,
    AT: torch.Tensor,
    BT: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    padding: list[int],
    fp16: bool,
) -> torch.Tensor:
    alpha = BT.shape[0]
    n, c, h, w = x.shape
    cout = U.shape[2]
    depthwise = c > 1 and U.shape[3] == 1 and cout == c
    if U.shape != (alpha, alpha, cout, 1 if depthwise else c) or AT.shape != (m, alpha) or alpha != m + 2:
        raise ValueError(
            f"winograd_conv2d: inconsistent shapes x{list(x.shape)} U{list(U.shape)} AT{list(AT.shape)} "
            f"BT{list(BT.shape)}"
        )
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // m), -(-wo // m)
    dt = torch.float16 if fp16 else torch.float32
    xp = torch.nn.functional.pad(x.to(dt), (pw, pw + tw * m + 2 - (w + 2 * pw), ph, ph + th * m + 2 - (h + 2 * ph)))
    tiles = xp.unfold(2, alpha, m).unfold(3, alpha, m)  # [N, C, th, tw, α, α]
    bt, at = BT.to(dt), AT.to(dt)
    v = _mm(_mm(bt, tiles, fp16), bt.t(), fp16)  # Bᵀ d B
    if depthwise:  # one elementwise product per point and channel (nothing to sum over)
        u = U.to(dt)[:, :, :, 0].permute(2, 0, 1).reshape(1, c, 1, 1, alpha, alpha)
        mm = (u.to(torch.float32) * v.to(torch.float32)).to(dt)
    else:
        p = n * th * tw
        v = v.permute(4, 5, 1, 0, 2, 3).reshape(alpha * alpha, c, p)
        mm = _mm(U.to(dt).reshape(alpha * alpha, cout, c), v, fp16)  # one GEMM per point
        mm = mm.reshape(alpha, alpha, cout, n, th, tw).permute(3, 2, 4, 5, 0, 1)  # [N, O, th, tw, α, α]
    y = _mm(_mm(at, mm, fp16), at.t(), fp16)  # [N, O, th, tw, m, m]
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, cout, th * m, tw * m)[:, :, :ho, :wo].to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32).view(1, -1, 1, 1)
    return y.to(x.dtype).contiguous()


@winograd_conv2d.register_fake
def _winograd_fake(x, U, AT, BT, bias, m, padding, fp16):  # type: ignore[no-untyped-def]
    n, _, h, w = x.shape
    return x.new_empty((n, U.shape[2], h + 2 * padding[0] - 2, w + 2 * padding[1] - 2))
