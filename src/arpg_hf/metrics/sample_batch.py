"""Image batches on disk in the ADM evaluation-suite layout.

An ADM sample or reference batch is an `.npz` whose `arr_0` holds uint8 images `(N, H, W, 3)`; reference batches
(e.g. `VIRTUAL_imagenet256_labeled.npz`) also carry the FID statistics `mu` `(2048,)` and `sigma` `(2048, 2048)` of
their Inception pool features (and spatial `mu_s` / `sigma_s`, unused here).
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from ..atomic_io import write_atomically

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_image_array(images, name: str = "images") -> np.ndarray:
    """ValueError unless `images` is a uint8 `(N, H, W, 3)` array (N >= 1)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty uint8 array of shape (N, H, W, 3) (the ADM layout), got {images.dtype} "
            f"{images.shape}."
        )
    return images


def save_npz_batch(path: str | os.PathLike, images: np.ndarray) -> None:
    """Writes an ADM-compatible sample batch (`arr_0`, uint8 `(N, H, W, 3)`), atomically (a hidden temporary sibling
    renamed into place)."""
    images = check_image_array(images)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as file:  # a file object: np.savez appends no ".npz" to the temporary name
            np.savez(file, arr_0=images)

    write_atomically(path, write)


def npz_size(arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """An upper bound of the bytes of an uncompressed `.npz` of arrays `name -> (shape, dtype)` (data, the .npy and
    zip headers)."""
    data = sum(int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return data + 512 * (len(arrays) + 1)


def save_npz_streaming(
    path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype, Iterable]]
) -> None:
    """Writes an uncompressed `.npz` (what `np.savez` writes, read by `np.load`) from arrays given as `name -> (shape,
    dtype, chunks)`, where `chunks` yields arrays of shape `(k, *shape[1:])` whose rows, in order, fill the array.
    Memory: one chunk, whatever the size of the arrays. Atomic: a hidden temporary sibling renamed into place; a
    ValueError (shape, dtype, count) leaves `path` as it was."""

    def write(temporary: str) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, (shape, dtype, chunks) in arrays.items():
                _write_npy_member(archive, name, tuple(int(n) for n in shape), np.dtype(dtype), chunks)

    write_atomically(path, write)


def _write_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    rows = 0
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.dtype != dtype or chunk.shape[1:] != shape[1:] or rows + chunk.shape[0] > shape[0]:
                raise ValueError(
                    f"{name}: rows {rows}.. are {chunk.dtype} {chunk.shape}, expected {dtype} (k, "
                    f"{', '.join(map(str, shape[1:]))}) within {shape[0]} rows."
                )
            member.write(np.ascontiguousarray(chunk).tobytes())
            rows += chunk.shape[0]
    if rows != shape[0]:
        raise ValueError(f"{name}: got {rows} rows, expected {shape[0]}.")


def read_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """All images of a folder (not recursive), sorted by file name, as uint8 `(N, H, W, 3)`."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder of images.")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise ValueError(f"The images of {folder} have different sizes {sorted(sizes)}; resize them to one size.")
    return np.stack(images)


def read_npz_batch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ADM `.npz` batch: `images` (from `arr_0`) and, when present, `mu` and `sigma`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .npz batch at {path}.")
    with np.load(path) as data:
        batch = {key: data[key] for key in ("mu", "sigma") if key in data.files}
        if "arr_0" in data.files:
            batch["images"] = check_image_array(data["arr_0"], f"{path} arr_0")
    if not batch:
        raise ValueError(f"{path} holds neither images (arr_0) nor FID statistics (mu, sigma); keys: {data.files}.")
    return batch


def read_images(path: str | os.PathLike) -> np.ndarray:
    """Images from a folder of image files or from an ADM `.npz` (`arr_0`), uint8 `(N, H, W, 3)`."""
    if os.path.isdir(path):
        return read_image_folder(path)
    batch = read_npz_batch(path)
    if "images" not in batch:
        raise ValueError(f"{path} holds no images (arr_0), only FID statistics.")
    return batch["images"]


def load_reference_statistics(reference) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics (mu, sigma) from an ADM reference `.npz` path, a mapping with `mu` and `sigma`, or a
    `(mu, sigma)` pair."""
    if isinstance(reference, (str, os.PathLike)):
        reference = read_npz_batch(reference)
        if "mu" not in reference or "sigma" not in reference:
            raise ValueError("The reference .npz has no FID statistics (mu, sigma); pass its images as references.")
    if isinstance(reference, Mapping):
        if "mu" not in reference or "sigma" not in reference:
            raise ValueError(f"Reference statistics need keys 'mu' and 'sigma', got {sorted(reference)}.")
        return np.asarray(reference["mu"], np.float64), np.asarray(reference["sigma"], np.float64)
    if isinstance(reference, (tuple, list)) and len(reference) == 2:
        return np.asarray(reference[0], np.float64), np.asarray(reference[1], np.float64)
    raise ValueError(
        "reference_statistics must be an ADM .npz path, a mapping with 'mu' and 'sigma', or a (mu, sigma) pair; "
        f"got {type(reference).__name__}."
    )
