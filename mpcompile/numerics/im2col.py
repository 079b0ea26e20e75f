"""im2col in TensorRT's reduction order: columns ordered (kh, kw, Cin), Cin fastest.

Why this order: TensorRT's sparse conv groups 4 consecutive *input channels* at one kernel
position, so calibration rows for a conv layer (and an explicit im2col lowering) must put
Cin innermost; PyTorch's ``F.unfold`` puts it outermost, which is the layout the papers'
CAST-conv used and TensorRT rejects.
"""

from __future__ import annotations

import numpy as np

__all__ = ["conv_output_size", "im2col_rows", "conv2d_via_im2col"]


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def im2col_rows(
    x: np.ndarray,
    kernel: tuple[int, int],
    *,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """Rows ``[N·OH·OW, kh·kw·C]`` of an NCHW input, columns in (kh, kw, C) order.

    Args:
        pads: ONNX order (top, left, bottom, right).
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = conv_output_size(h, kh, sh, top, bottom, dh)
    ow = conv_output_size(w, kw, sw, left, right, dw)
    s_n, s_c, s_h, s_w = xp.strides
    # view [N, OH, OW, kh, kw, C] without copying, then one copy into rows
    windows = np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, oh, ow, kh, kw, c),
        strides=(s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c),
        writeable=False,
    )
    return windows.reshape(n * oh * ow, kh * kw * c)


def conv2d_via_im2col(
    x: np.ndarray,
    w_matrix: np.ndarray,
    bias: np.ndarray | None,
    kernel: tuple[int, int],
    **geometry,
) -> np.ndarray:
    """Reference conv from the TensorRT-order matrix ``[Cout, kh·kw·Cin]`` (for tests)."""
    n, _, h, w = x.shape
    rows = im2col_rows(x, kernel, **geometry)
    out = rows @ w_matrix.T
    if bias is not None:
        out = out + bias
    sh, sw = geometry.get("strides", (1, 1))
    dh, dw = geometry.get("dilations", (1, 1))
    top, left, bottom, right = geometry.get("pads", (0, 0, 0, 0))
    oh = conv_output_size(h, kernel[0], sh, top, bottom, dh)
    ow = conv_output_size(w, kernel[1], sw, left, right, dw)
    return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
