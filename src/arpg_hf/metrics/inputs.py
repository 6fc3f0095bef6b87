"""Input conversion shared by the metrics: feature matrices and image batches in the layouts users pass."""

from __future__ import annotations

import numpy as np
import torch


def as_feature_matrix(features, name: str, min_rows: int = 1, dtype=np.float64) -> np.ndarray:
    """An (N, D) array or tensor (or a list of D-vectors) as a numpy array of `dtype`; ValueError otherwise."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    try:
        matrix = np.asarray(features, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an (N, D) array of numbers, got {type(features).__name__}: {error}") from None
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array (one feature vector per row), got shape {matrix.shape}.")
    if matrix.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got {matrix.shape[0]}.")
    return matrix


def _image_to_uint8_hwc(image, index: int) -> np.ndarray:
    """One image (PIL, (H, W[, C]) array/tensor, uint8 or floats in [0, 1]) -> (H, W, 3) uint8."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Image {index} must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels, got shape {array.shape}."
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"Image {index} must be uint8 or floats in [0, 1], got dtype {array.dtype}.")
        array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
    array = array[..., :3]
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def images_to_uint8_batch(images) -> torch.Tensor:
    """Images as users hold them -> a (B, 3, H, W) uint8 tensor.

    Accepts a list of PIL images / (H, W, C) arrays / (C, H, W) tensors, an (N, H, W, 3) uint8 array (e.g. an ADM
    `.npz` batch `arr_0`), or an (N, 3, H, W) tensor; float images are taken in [0, 1]. All images must share one size.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = images.permute(0, 2, 3, 1) if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3) else images
        images = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if len(images) == 0:
        raise ValueError("Got no images; pass at least one.")
    arrays = [_image_to_uint8_hwc(image, i) for i, image in enumerate(images)]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"All images of a batch must have the same size, got {sorted(sizes)} (height, width).")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
