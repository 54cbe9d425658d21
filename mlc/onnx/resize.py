"""ONNX Resize (opsets 10, 11, 13, 18, 19) as one dense matrix per axis, which the importer applies
as a product: M @ x along that axis.

Nearest, linear and cubic resizing (with or without antialias) are separable in
the ONNX definition, so an N-D Resize equals a chain of 1-D resizes:

    for axis, M, outside in resize_plan(x.shape, attrs, roi, scales, sizes, opset):
        x = np.moveaxis(np.tensordot(M, x, axes=(1, axis)), 0, axis)
        x[outside along axis] = extrapolation_value       # tf_crop_and_resize only

Rows of M that are `outside` are all zero, so each step is also the affine map
`M @ x + extrapolation_value * outside[:, None]`.

Semantics follow the operator doc and the test data shipped with onnx. Where
the two are ambiguous, the choice made is noted next to the code.
"""
from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------- coordinates


def source_coords(in_size, out_size, scale, roi, ctm):
    """Input coordinate x_original of every output index, and the
    tf_crop_and_resize 'outside' mask (all False for other modes)."""
    y = np.arange(out_size, dtype=np.float64)
    # The doc's `length_resized` / `output_width` is in_size * scale: fractional
    # when it comes from `scales` (test_resize_downsample_scales_linear_align_corners
    # depends on it), both in the denominators and in the "length > 1" guards.
    # A scale derived from sizes may miss out_size by an ulp: snap it back.
    length = in_size * scale
    if math.isclose(length, out_size, rel_tol=1e-9):
        length = float(out_size)
    if ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        # Keeps the centre of the input on the centre of the (truncated) output.
        offset = in_size / 2 * (1 - out_size / length)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        # The doc says 0 when length <= 1. (onnx's reference uses -0.5 when length
        # == 1 and the formula when < 1; that only matters for cubic, antialias
        # or exclude_outside.)
        x = (y + 0.5) / scale - 0.5 if length > 1 else np.zeros(out_size)
    elif ctm == "tf_half_pixel_for_nn":  # opset 11 only
        x = (y + 0.5) / scale
    elif ctm == "align_corners":
        x = y * (in_size - 1) / (length - 1) if length > 1 else np.zeros(out_size)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        if roi is None:
            raise ValueError("tf_crop_and_resize needs roi")
        start, end = float(roi[0]), float(roi[1])
        # Same operation order as onnx's reference, so the roi edges come out exact.
        # (For length < 1, reachable through keep_aspect_ratio_policy, the
        # reference uses the formula rather than the doc's centre.)
        if length > 1:
            x = y * (end - start) * (in_size - 1) / (length - 1) + start * (in_size - 1)
        else:
            x = np.full(out_size, 0.5 * (start + end) * (in_size - 1))
        return x, (x < 0) | (x > in_size - 1)
    else:
        raise ValueError(f"unsupported coordinate_transformation_mode {ctm!r}")
    return x, np.zeros(out_size, dtype=bool)


# -------------------------------------------------------------------- kernels


def nearest_index(x, nearest_mode, scale):
    """Index of the input sample picked by mode='nearest' (before clamping)."""
    f = np.floor(x)
    frac = x - f  # rounding on the fraction avoids x - 0.5 rounding errors
    if nearest_mode == "round_prefer_floor":
        i = f + (frac > 0.5)
    elif nearest_mode == "round_prefer_ceil":
        i = f + (frac >= 0.5)
    elif nearest_mode == "floor":
        i = f
    elif nearest_mode == "ceil":
        i = np.ceil(x)
    elif nearest_mode == "opset10":
        # Resize-10 had no nearest_mode; its test data (and onnxruntime) take
        # ceil when downsampling and floor (truncation, x >= 0) when upsampling.
        i = np.ceil(x) if scale < 1 else f
    else:
        raise ValueError(f"unsupported nearest_mode {nearest_mode!r}")
    return i.astype(np.int64)


def _linear(d):
    return np.maximum(0.0, 1.0 - np.abs(d))


def _cubic(d, a):
    """Keys' cubic convolution kernel with coefficient a (support |d| < 2)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def filter_taps(x, mode, scale, cubic_coeff_a, antialias):
    """(indices, weights), each [out, taps], of a linear or cubic filter centred
    on x. Indices may lie outside the input; the caller clamps them."""
    kernel, radius = (_linear, 1) if mode == "linear" else (lambda d: _cubic(d, cubic_coeff_a), 2)
    # Antialias stretches the filter by 1/scale when downsampling so that every
    # input sample contributes; it then no longer sums to 1 and is renormalised.
    s = min(scale, 1.0) if antialias else 1.0
    ntaps = math.ceil(2 * radius / s) + 2  # covers every tap with nonzero weight
    idx = np.floor(x - radius / s).astype(np.int64)[:, None] + np.arange(ntaps)
    w = kernel(s * (idx - x[:, None]))
    if antialias:
        w = w / w.sum(axis=1, keepdims=True)
    return idx, w


# --------------------------------------------------------------- the matrix


def resize_matrix(in_size: int, out_size: int, scale: float, roi: tuple[float, float] | None,
                  mode: str, coordinate_transformation_mode: str, nearest_mode: str,
                  cubic_coeff_a: float, exclude_outside: bool, antialias: bool,
                  extrapolation_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize along one axis as y = M @ x, with M float64 [out_size, in_size].

    `scale` is the axis' scale factor (scales[i], or the one derived from sizes),
    `roi` its (start, end) pair, used by tf_crop_and_resize only.
    Returns (M, outside): outside[j] marks outputs whose source lies outside the
    input in tf_crop_and_resize mode. Their rows of M are zero; they take
    extrapolation_value, which the caller applies (it does not change M).
    """
    del extrapolation_value  # not part of the linear map, see docstring
    M = np.zeros((out_size, in_size))
    if out_size == 0 or in_size == 0:
        return M, np.zeros(out_size, dtype=bool)
    x, outside = source_coords(in_size, out_size, float(scale), roi, coordinate_transformation_mode)
    if mode == "nearest":
        idx = nearest_index(x, nearest_mode, scale)[:, None]
        w = np.ones(idx.shape)
    elif mode in ("linear", "cubic"):
        idx, w = filter_taps(x, mode, float(scale), cubic_coeff_a, antialias)
    else:
        raise ValueError(f"unsupported mode {mode!r}")
    if exclude_outside:
        # Drop taps beyond the border and renormalise (a row with no tap left stays 0).
        w = np.where((idx >= 0) & (idx < in_size), w, 0.0)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    # Otherwise taps beyond the border read the edge sample (edge padding).
    rows = np.broadcast_to(np.arange(out_size)[:, None], idx.shape)
    np.add.at(M, (rows, np.clip(idx, 0, in_size - 1)), w)
    M[outside] = 0.0
    return M, outside


# ----------------------------------------------------------------- the plan


def _str(v):
    return v.decode() if isinstance(v, bytes) else v


def _given(a):
    """Optional inputs may be absent (None) or passed as empty tensors."""
    return None if a is None or np.asarray(a).size == 0 else np.asarray(a)


def _is_identity(M, outside):
    n, m = M.shape
    return n == m and not outside.any() and np.allclose(M, np.eye(n), rtol=0, atol=1e-12)


def resize_plan(x_shape, attrs: dict, roi, scales, sizes, opset: int):
    """Per-axis matrices [(axis, M, outside)] of a Resize node, in axis order.

    attrs: attribute name -> value (str or bytes); roi, scales, sizes: the
    node's constant inputs as arrays, None or empty when absent. Axes whose
    matrix is the identity are left out. The outside rows take
    attrs['extrapolation_value'] (default 0).
    """
    rank = len(x_shape)
    get = lambda name, default: _str(attrs.get(name, default))
    roi, scales, sizes = _given(roi), _given(scales), _given(sizes)

    if opset < 11:
        # Resize-10: inputs (X, scales) only, asymmetric coordinates, no options.
        mode, ctm, nearest_mode = get("mode", "nearest"), "asymmetric", "opset10"
        cubic_a, exclude, antialias = -0.75, False, False
        if mode not in ("nearest", "linear"):
            raise ValueError(f"Resize-10 has no mode {mode!r}")
        roi = sizes = None
    else:
        mode = get("mode", "nearest")
        ctm = get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = get("nearest_mode", "round_prefer_floor")
        cubic_a = float(attrs.get("cubic_coeff_a", -0.75))
        exclude = bool(attrs.get("exclude_outside", 0))
        antialias = bool(attrs.get("antialias", 0)) and opset >= 18

    axes = list(attrs.get("axes", range(rank))) if opset >= 18 else list(range(rank))
    axes = [a + rank if a < 0 else a for a in axes]
    in_sizes = [int(x_shape[a]) for a in axes]

    if sizes is not None:
        out_sizes = [int(s) for s in sizes]
        axis_scales = [o / i for o, i in zip(out_sizes, in_sizes)]
        policy = get("keep_aspect_ratio_policy", "stretch") if opset >= 18 else "stretch"
        if policy != "stretch":
            # One scale for all resized axes; sizes are rounded half up.
            pick = {"not_larger": min, "not_smaller": max}[policy]
            s = pick(axis_scales)
            axis_scales = [s] * len(axes)
            out_sizes = [int(math.floor(s * i + 0.5)) for i in in_sizes]
    elif scales is not None:
        axis_scales = [float(s) for s in scales]
        # floor(in * scale); roi does not shrink it (onnx shape inference and
        # reference agree, despite the doc's formula with roi).
        out_sizes = [int(math.floor(s * i)) for s, i in zip(axis_scales, in_sizes)]
    else:
        raise ValueError("Resize needs scales or sizes")

    plan = []
    for k, axis in enumerate(axes):
        axis_roi = None
        if ctm == "tf_crop_and_resize":
            if roi is None:
                raise ValueError("tf_crop_and_resize needs roi")
            axis_roi = (float(roi[k]), float(roi[k + len(axes)]))
        M, outside = resize_matrix(in_sizes[k], out_sizes[k], axis_scales[k], axis_roi, mode, ctm,
                                   nearest_mode, cubic_a, exclude, antialias,
                                   float(attrs.get("extrapolation_value", 0.0)))
        if not _is_identity(M, outside):
            plan.append((axis, M, outside))
    return plan
