"""Condition maps for ControlARPG, computed from ordinary images.

- `edges`: [`canny_edges`], a Canny edge detector (Gaussian smoothing, Sobel gradients, non-maximum suppression,
  hysteresis between two thresholds) in numpy: white one-pixel edges on black, the image's size. This is the format
  diffusers' ControlNet pipelines take as a Canny image, so maps made with OpenCV (`cv2.Canny`) work as well.
- `depth`: no depth estimator ships with arpg-hf (none is available offline). A depth control image is a
  single-channel map of the canvas size, white = near, black = far, scaled to the full range; [`depth_to_control_image`]
  turns any estimator's output (e.g. `transformers.pipeline("depth-estimation")(image)["predicted_depth"]`) into one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SOBEL_NORM = 4.0  # |Sobel| of a unit step: a full black-to-white edge has gradient 1 after division


def _grey(image) -> np.ndarray:
    """PIL image or array (H, W[, C]) in [0, 255] (uint8) or [0, 1] (float) -> (H, W) float64 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    if array.ndim == 3:
        array = array.mean(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"Expected an image (H, W) or (H, W, C), got an array of shape {array.shape}.")
    return array.astype(np.float64) / scale


def _gaussian_blur(grey: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return grey
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(grey, radius, mode="reflect")
    rows = sum(w * padded[:, i : i + grey.shape[1]] for i, w in enumerate(taps))  # (H + 2r, W)
    return sum(w * rows[i : i + grey.shape[0]] for i, w in enumerate(taps))  # (H, W)


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(grey, 1, mode="edge")
    h, w = grey.shape

    def shifted(dy, dx):
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (shifted(-1, 1) + 2 * shifted(0, 1) + shifted(1, 1)) - (shifted(-1, -1) + 2 * shifted(0, -1) + shifted(1, -1))
    gy = (shifted(1, -1) + 2 * shifted(1, 0) + shifted(1, 1)) - (shifted(-1, -1) + 2 * shifted(-1, 0) + shifted(-1, 1))
    return gx / SOBEL_NORM, gy / SOBEL_NORM


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keeps a pixel whose magnitude is the largest of its two neighbours across the edge."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = (np.floor((angle + 22.5) / 45.0).astype(int)) % 4  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    p = np.pad(magnitude, 1)
    h, w = magnitude.shape
    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}  # (dy, dx) along the gradient (rows grow downwards)
    keep = np.zeros_like(magnitude, dtype=bool)
    for index, (dy, dx) in steps.items():
        ahead = p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = p[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (direction == index) & (magnitude >= ahead) & (magnitude >= behind)
    return np.where(keep, magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected to a strong one, through weak pixels, join it."""
    edges = strong.copy()
    while True:
        p = np.pad(edges, 1)
        h, w = edges.shape
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown &= weak
        grown |= edges
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def canny_edges(image, low_threshold: float = 0.1, high_threshold: float = 0.2, sigma: float = 1.0) -> Image.Image:
    """Canny edges of an image: a greyscale PIL image of its size, 255 on an edge and 0 elsewhere.

    Args:
        image: a PIL image (any mode), or an array (H, W[, C]) of uint8 in [0, 255] or floats in [0, 1].
        low_threshold, high_threshold (`float`): gradient magnitudes of the hysteresis, as a fraction of a full
            black-to-white step (Sobel magnitude / 4); 0 <= low <= high.
        sigma (`float`): standard deviation of the Gaussian smoothing, in pixels (0: none).
    """
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"Need 0 <= low_threshold <= high_threshold, got {low_threshold} and {high_threshold}.")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}.")
    grey = _gaussian_blur(_grey(image), sigma)
    gx, gy = _sobel(grey)
    thin = _thin(np.hypot(gx, gy), gx, gy)
    edges = _hysteresis(thin >= high_threshold, thin >= max(low_threshold, 1e-12))
    return Image.fromarray((edges * 255).astype(np.uint8), mode="L")


def depth_to_control_image(depth, size: tuple[int, int] | None = None) -> Image.Image:
    """A depth control image from an estimator's output: greyscale, white = near, scaled to [0, 255].

    Args:
        depth: an array or tensor (H, W) (or (1, H, W)) of depth (larger = farther) or a PIL image of it.
        size (`tuple[int, int]`, *optional*): (width, height) to resize to (the canvas).
    """
    values = np.asarray(depth.convert("F") if isinstance(depth, Image.Image) else depth, dtype=np.float64).squeeze()
    if values.ndim != 2:
        raise ValueError(f"Expected a depth map (H, W), got shape {values.shape}.")
    low, high = float(values.min()), float(values.max())
    near = (high - values) / (high - low) if high > low else np.zeros_like(values)
    image = Image.fromarray(np.rint(near * 255).astype(np.uint8), mode="L")
    return image.resize(size, Image.BILINEAR) if size is not None else image


def compute_control_image(image, control_type: str = "edges") -> Image.Image:
    """The condition map of `control_type` for an ordinary image (what tokenization stores and the CLI computes).

    Only "edges" is computed here; "depth" needs an estimator, see [`depth_to_control_image`].
    """
    if control_type == "edges":
        return canny_edges(image)
    if control_type == "depth":
        raise ValueError(
            "arpg-hf ships no depth estimator: compute depth with one (e.g. transformers' depth-estimation pipeline), "
            "turn it into a control image with arpg_hf.depth_to_control_image, and pass that map directly."
        )
    raise ValueError(f"control_type must be 'edges' or 'depth', got {control_type!r}.")
