"""Pre-tokenized image datasets: the on-disk format, image augmentation, loading, validation and batch order.

A token dataset is a folder::

    TOKENS/
      tokenizer_info.json              grid, codebook size, crops, resolution, class names, source tokenizer
      data/train-00000-of-00004.parquet
      data/train-00001-of-00004.parquet ...
      skipped_images.json              unreadable source images left out (tokenize_dataset.py --skip_bad_images)

Each row holds ``codes`` (int16, or int32 for codebooks above 32768 codes) of shape ``(n_crops, grid_height *
grid_width)``, the VQ indices of every augmented view of one image in raster order, and ``label``, a ``ClassLabel``.
The shards load with ``datasets.load_dataset("parquet", data_files="TOKENS/data/*.parquet")`` as well. Every file
is written under a hidden temporary name and renamed into place, so a shard that exists is complete; a folder that
lacks some of its shards (an interrupted tokenization) is refused by [`load_token_dataset`].
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .atomic_io import PARTIAL, remove_stale_staging, write_text_atomically
from .optional_dependencies import require
from .training_utils import derive_seed

TOKENIZER_INFO_NAME = "tokenizer_info.json"
DATA_SUBDIR = "data"
SHARD_NAME = "train-{index:05d}-of-{total:05d}.parquet"
SHARD_PATTERN = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")
SKIPPED_FILE = "skipped_images.json"  # every source image left out as unreadable: row, path, reason
SKIPPED_SUBDIR = "skipped"  # per shard: the images its rows leave out (written before the shard, merged at the end)
# Temporary names of earlier versions of the writers (visible names): removed like the hidden leftovers.
_LEGACY_TEMPORARY = re.compile(r"^(train-\d{5}-of-\d{5}\.parquet|tokenizer_info\.json)\.tmp(-\d+)?$")
# LlamaGen's ten-crop recipe: resize the short side to 1.1 x the resolution, then take ten crops of the resolution.
DEFAULT_CROP_RANGE = 1.1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class TokenDatasetInfo:
    """What `tokenizer_info.json` records about a token dataset.

    Args:
        grid_height (`int`): token rows per image.
        grid_width (`int`): token columns per image.
        codebook_size (`int`): codes are in `[0, codebook_size)`.
        n_crops (`int`): augmented views stored per image.
        resolution (`int`, *optional*): image size that was encoded.
        class_names (`list[str]`, *optional*): the name of every class id.
        vqvae (`str`, *optional*): the tokenizer (path or Hub id) that produced the codes.
        augmentation (`str`, *optional*): "ten_crop+flip", "ten_crop", "center+flip" or "center".
        num_samples (`int`, *optional*): rows in the dataset.
    """

    grid_height: int
    grid_width: int
    codebook_size: int
    n_crops: int
    resolution: int | None = None
    class_names: list[str] | None = None
    vqvae: str | None = None
    augmentation: str | None = None
    num_samples: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.grid_height * self.grid_width

    def save(self, directory: str | os.PathLike) -> None:
        write_text_atomically(os.path.join(directory, TOKENIZER_INFO_NAME), json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TokenDatasetInfo":
        with open(os.path.join(directory, TOKENIZER_INFO_NAME)) as handle:
            fields = json.load(handle)
        known = {name: fields.pop(name) for name in list(fields) if name in cls.__dataclass_fields__}
        known.setdefault("extra", {}).update(fields)
        return cls(**known)


def codes_dtype(codebook_size: int) -> str:
    """The smallest integer type that holds every code: int16 up to 32768 codes, int32 beyond."""
    return "int16" if codebook_size <= 2**15 else "int32"


def unique_class_names(class_names: Sequence[str]) -> list[str]:
    """`ClassLabel` needs distinct names; a repeated name gets its class id appended (ImageNet has two "crane")."""
    counts = {}
    for name in class_names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({i})" if counts[name] > 1 else name for i, name in enumerate(class_names)]


def token_features(
    n_crops: int, num_tokens: int, class_names: Sequence[str], codebook_size: int, control_size: int | None = None
):
    """The `datasets.Features` of a token dataset: codes `(n_crops, num_tokens)` and a `ClassLabel` (names made
    distinct with [`unique_class_names`]); with `control_size`, a `control` column of condition maps
    `(n_crops, control_size, control_size)` uint8 (ControlARPG)."""
    datasets = require("datasets", "training", "arpg_hf.token_dataset.token_features")

    features = {
        "codes": datasets.Array2D((n_crops, num_tokens), codes_dtype(codebook_size)),
        "label": datasets.ClassLabel(names=unique_class_names(class_names)),
    }
    if control_size is not None:
        features["control"] = datasets.Array3D((n_crops, control_size, control_size), "uint8")
    return datasets.Features(features)


def shard_path(output_dir: str | os.PathLike, index: int, total: int) -> str:
    return os.path.join(output_dir, DATA_SUBDIR, SHARD_NAME.format(index=index, total=total))


def remove_staging_leftovers(output_dir: str | os.PathLike) -> None:
    """Removes what killed writers left in a token folder: the hidden temporary files of `arpg_hf.atomic_io`
    (`.NAME.partial-*`) and the visible temporary names of earlier versions. Call it in one process, before any
    process writes."""
    for folder in (output_dir, os.path.join(output_dir, DATA_SUBDIR), os.path.join(output_dir, SKIPPED_SUBDIR)):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.startswith(".") and PARTIAL in name:
                remove_stale_staging(os.path.join(folder, name[1 : name.index(PARTIAL)]))
            elif _LEGACY_TEMPORARY.match(name):
                os.remove(os.path.join(folder, name))


def check_shard_count(output_dir: str | os.PathLike, num_shards: int, cut: str, resume: str) -> None:
    """ValueError when `output_dir` already holds shards cut into another number of shards than `num_shards` (mixing
    them would corrupt the dataset). `cut` says what sets the count (e.g. "--shard_size 100"), `resume` how to
    resume the earlier run instead."""
    folder = os.path.join(output_dir, DATA_SUBDIR)
    if not os.path.isdir(folder):
        return
    others = sorted(
        name
        for name in os.listdir(folder)
        if (match := SHARD_PATTERN.match(name)) and int(match.group(2)) != num_shards
    )
    if others:
        raise ValueError(
            f"{folder} holds shards of another run ({others[0]}{', ...' if len(others) > 1 else ''}), but this one "
            f"cuts the data into {num_shards} shard(s) ({cut}). Use an empty --output_dir, or {resume}."
        )


# ------------------------------------------------------------------------------------------------ augmentation


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the short side to `size` and crops the centre square (ADM / LlamaGen preprocessing).

    Large images are first halved with a box filter while the short side is at least `2 * size` (anti-aliasing),
    then resized with a bicubic filter.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def five_crops(image: Image.Image, size: int) -> list[Image.Image]:
    """The four corner crops and the centre crop: top-left, top-right, bottom-left, bottom-right, centre."""
    width, height = image.size
    if size > min(width, height):
        raise ValueError(f"Crop size {size} exceeds the image size {width}x{height}.")
    left, top = int(round((width - size) / 2)), int(round((height - size) / 2))
    corners = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size), (left, top)]
    return [image.crop((x, y, x + size, y + size)) for x, y in corners]


def augment_image(
    image: Image.Image,
    resolution: int,
    ten_crop: bool = False,
    flip: bool = True,
    crop_range: float = DEFAULT_CROP_RANGE,
) -> list[Image.Image]:
    """The views of one image that are tokenized, all `resolution` x `resolution`, RGB.

    Args:
        image (`PIL.Image.Image`): any mode and size.
        resolution (`int`): side of every view.
        ten_crop (`bool`, *optional*, defaults to `False`): resize the short side to `int(resolution * crop_range)`
            and take the five crops (corners + centre); otherwise one centre crop at `resolution`.
        flip (`bool`, *optional*, defaults to `True`): add the same views of the horizontally flipped image.
        crop_range (`float`, *optional*, defaults to 1.1): ratio of the resized short side to `resolution`.

    Returns:
        `list[PIL.Image.Image]`: 10 views (ten crop + flip), 5, 2 (centre + flip) or 1, unflipped views first.
    """
    image = image.convert("RGB")
    if ten_crop:
        if crop_range < 1:
            raise ValueError(f"crop_range must be >= 1 (the resized image must hold the crops), got {crop_range}.")
        base = resize_and_center_crop(image, int(resolution * crop_range))
        views = five_crops(base, resolution)
        if flip:
            views += five_crops(base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), resolution)
        return views
    base = resize_and_center_crop(image, resolution)
    return [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if flip else [base]


def augmentation_name(ten_crop: bool, flip: bool) -> str:
    return ("ten_crop" if ten_crop else "center") + ("+flip" if flip else "")


def num_views(ten_crop: bool, flip: bool) -> int:
    return (5 if ten_crop else 1) * (2 if flip else 1)


class UnreadableImageError(ValueError):
    """A source image that cannot be decoded (truncated, not an image, empty file)."""


def read_image(value, feature=None) -> Image.Image:
    """Decodes one image cell of a `datasets` table (`{"path", "bytes"}` as stored with `Image(decode=False)`, a path,
    or an already decoded PIL image) fully, so that a truncated file fails here rather than later.

    `feature` is the column's `datasets.Image` feature (its `mode` is applied); decoding follows `datasets` exactly.
    Raises [`UnreadableImageError`] (one line, without the path: the caller names the row) when it cannot be read.
    Truncated files are never accepted (PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left as it is, False by default).
    """
    if hasattr(value, "convert"):
        return value
    if not isinstance(value, (dict, str)):
        raise UnreadableImageError(f"not an image but {type(value).__name__}")
    if isinstance(value, dict) and value.get("bytes") is not None and len(value["bytes"]) == 0:
        raise UnreadableImageError("empty file (0 bytes)")
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        path = value["path"]
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise UnreadableImageError("empty file (0 bytes)")
    datasets = require("datasets", "training", "arpg_hf.token_dataset.read_image")
    decoder = datasets.Image(mode=getattr(feature, "mode", None))
    try:
        image = decoder.decode_example({"path": value, "bytes": None} if isinstance(value, str) else value)
    except Image.UnidentifiedImageError as error:  # its message repeats the path, which the caller names anyway
        raise UnreadableImageError("not an image file PIL can identify (UnidentifiedImageError)") from error
    except Exception as error:  # noqa: BLE001 - PIL raises many types on bad data (OSError, SyntaxError, struct.error)
        raise UnreadableImageError(error_reason(error)) from error
    return image


def error_reason(error: BaseException, limit: int = 200) -> str:
    """`error` as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> float32 tensor `(n, 3, H, W)` in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # (n, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (n, 3, H, W)


# ------------------------------------------------------------------------------------------------ tokenizer


def load_vq_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs):
    """Loads an [`ARPGVQModel`] from a pipeline folder or Hub id (its `vqvae/` subfolder) or a bare VQ folder / id."""
    from .vq_model import ARPGVQModel

    name_or_path = str(name_or_path)
    if os.path.isdir(name_or_path):
        subfolder = "vqvae" if os.path.isfile(os.path.join(name_or_path, "vqvae", "config.json")) else None
        if subfolder is None and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(
                f"{name_or_path} holds neither a pipeline (vqvae/config.json) nor an ARPGVQModel (config.json). "
                "Pass a pipeline folder saved by ARPGPipeline.save_pretrained or a folder saved by "
                "ARPGVQModel.save_pretrained."
            )
        return ARPGVQModel.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype, **kwargs)
    try:
        return ARPGVQModel.from_pretrained(name_or_path, subfolder="vqvae", torch_dtype=dtype, **kwargs)
    except OSError:  # not a pipeline: a bare ARPGVQModel repository
        return ARPGVQModel.from_pretrained(name_or_path, torch_dtype=dtype, **kwargs)


# ------------------------------------------------------------------------------------------------ loading


def _looks_like_image_folder(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


def load_token_dataset(name_or_path: str | os.PathLike, split: str = "train", cache_dir: str | None = None):
    """Loads a token dataset written by `pipelines/tokenize_dataset.py` (or any dataset with `codes` and `label`).

    Args:
        name_or_path (`str`): a token folder (`tokenizer_info.json` + `data/*.parquet`), a folder saved with
            `Dataset.save_to_disk`, a folder of parquet/arrow files, or a Hub dataset id.
        split (`str`, *optional*, defaults to `"train"`): the split of a Hub dataset.

    Returns:
        `tuple(datasets.Dataset, TokenDatasetInfo | None)`: the rows and the recorded info (None when absent).
    """
    datasets = require("datasets", "training", "arpg_hf.load_token_dataset")

    name_or_path = str(name_or_path)
    info = None
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, TOKENIZER_INFO_NAME)):
            info = TokenDatasetInfo.load(name_or_path)
        if os.path.isfile(os.path.join(name_or_path, "state.json")):
            dataset = datasets.load_from_disk(name_or_path)
        else:
            files = sorted(glob.glob(os.path.join(name_or_path, DATA_SUBDIR, "*.parquet")))
            files = files or sorted(glob.glob(os.path.join(name_or_path, "**", "*.parquet"), recursive=True))
            arrow = sorted(glob.glob(os.path.join(name_or_path, "**", "*.arrow"), recursive=True))
            if files:
                _check_complete_shards(files, name_or_path)
                _check_not_empty(files, name_or_path)
                dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
            elif arrow:
                dataset = datasets.load_dataset("arrow", data_files=arrow, split="train", cache_dir=cache_dir)
            elif _looks_like_image_folder(name_or_path):
                raise ValueError(
                    f"{name_or_path} holds images, not tokens. Tokenize it first (this needs the VQ tokenizer):\n"
                    f"  accelerate launch pipelines/tokenize_dataset.py --image_dir {name_or_path} "
                    "--vqvae PIPELINE_OR_VQ_DIR --output_dir TOKENS --resolution 256 --ten_crop\n"
                    "then train with --train_data_dir TOKENS."
                )
            else:
                raise ValueError(
                    f"No token dataset found in {name_or_path}: expected {TOKENIZER_INFO_NAME} with "
                    f"{DATA_SUBDIR}/*.parquet shards (written by pipelines/tokenize_dataset.py), parquet/arrow files "
                    "or a folder saved with Dataset.save_to_disk."
                )
    else:
        dataset = datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir)
        info = _hub_token_info(name_or_path)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    return dataset, info


def _check_complete_shards(parquet_files: list[str], source: str) -> None:
    """ValueError when the shards named `train-XXXXX-of-YYYYY.parquet` of one folder are not exactly one complete set
    (a tokenization that was interrupted, or shards of two runs with different shard counts)."""
    by_folder: dict[str, dict[int, set[int]]] = {}
    for path in parquet_files:
        match = SHARD_PATTERN.match(os.path.basename(path))
        if match:
            totals = by_folder.setdefault(os.path.dirname(path), {})
            totals.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    for folder, totals in by_folder.items():
        if len(totals) > 1:
            counts = ", ".join(f"-of-{total:05d}" for total in sorted(totals))
            raise ValueError(
                f"{folder} holds shards of {len(totals)} different tokenizations ({counts}): remove the shards of the "
                "other run(s), or tokenize into an empty --output_dir."
            )
        ((total, present),) = totals.items()
        missing = sorted(set(range(total)) - present)
        if missing:
            shown = ", ".join(SHARD_NAME.format(index=i, total=total) for i in missing[:3])
            raise ValueError(
                f"{source} is incomplete: {len(missing)} of {total} shards are missing ({shown}"
                f"{', ...' if len(missing) > 3 else ''}); its tokenization was interrupted. Rerun "
                "pipelines/tokenize_dataset.py with the same arguments to finish it."
            )


def _check_not_empty(parquet_files: list[str], source: str) -> None:
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(path).metadata.num_rows for path in parquet_files) == 0:
        raise ValueError(
            f"The token dataset {source} is empty (0 rows in {len(parquet_files)} parquet file(s)). Tokenize a "
            "non-empty image folder with pipelines/tokenize_dataset.py."
        )


def _hub_token_info(repo_id: str) -> TokenDatasetInfo | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, TOKENIZER_INFO_NAME, repo_type="dataset")
    except (EntryNotFoundError, OSError):
        return None
    return TokenDatasetInfo.load(os.path.dirname(path))


def class_names_of(dataset, info: TokenDatasetInfo | None = None) -> list[str] | None:
    """Class names from the `label` ClassLabel feature, else from the info file, else None."""
    datasets = require("datasets", "training", "arpg_hf.token_dataset.class_names_of")

    feature = dataset.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return list(info.class_names) if info is not None and info.class_names else None


# ------------------------------------------------------------------------------------------------ validation


def check_token_dataset(
    dataset,
    info,
    config,
    codebook_size: int | None = None,
    source: str = "the token dataset",
    shard: tuple[int, int] = (0, 1),
    chunk_size: int = 8192,
) -> None:
    """Raises ValueError, saying what was expected and how to fix it, unless the rows fit the model.

    Checks: at least one row; `codes` and `label` columns; every row's codes are `(n_crops, num_image_tokens)` (or
    `(num_image_tokens,)`) with values in `[0, vocab_size)`; labels in `[0, num_classes)`; the recorded grid and
    codebook match `config`; the tokenizer's `codebook_size`, when given, equals `config.vocab_size`.
    Rows `shard[0]::shard[1]`-chunked are scanned, so several processes can split the scan.

    Args:
        dataset (`datasets.Dataset`): the rows.
        info (`TokenDatasetInfo` or `None`): the recorded info.
        config (`ARPGConfig`): the model to train.
    """
    num_tokens, vocab_size, num_classes = config.num_image_tokens, config.vocab_size, config.num_classes
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty (0 rows). Tokenize a non-empty image folder, or check the dataset/split.")
    missing = {"codes", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {sorted(missing)}; it has {dataset.column_names}. Token datasets hold "
            "'codes' (VQ indices per crop) and 'label' (class id): write them with pipelines/tokenize_dataset.py."
        )
    _check_info(info, config, codebook_size, source)
    index, count = shard
    rows_as_numpy = dataset.with_format("numpy", columns=["codes", "label"])
    for start in range(index * chunk_size, len(dataset), count * chunk_size):
        rows = rows_as_numpy[start : start + chunk_size]
        _check_chunk(rows["codes"], rows["label"], start, num_tokens, vocab_size, num_classes, source)


def _check_info(info, config, codebook_size, source) -> None:
    if codebook_size is not None and codebook_size != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {codebook_size} codes but the model predicts vocab_size={config.vocab_size}. Use the "
            "tokenizer the data was encoded with, and a model config whose vocab_size is its codebook size."
        )
    if info is None:
        return
    if (info.grid_height, info.grid_width) != (config.grid_height, config.grid_width):
        raise ValueError(
            f"{source} was tokenized to a {info.grid_height}x{info.grid_width} grid"
            f"{f' (resolution {info.resolution})' if info.resolution else ''} but "
            f"the model expects {config.grid_height}x{config.grid_width}. Re-tokenize at resolution "
            f"{config.grid_height} x the tokenizer's downsample factor, or use a config with this grid."
        )
    if info.codebook_size != config.vocab_size:
        raise ValueError(
            f"{source} was encoded with a {info.codebook_size}-code tokenizer but the model has vocab_size="
            f"{config.vocab_size}. Set vocab_size to {info.codebook_size} or re-tokenize."
        )


def _check_chunk(codes, labels, offset, num_tokens, vocab_size, num_classes, source) -> None:
    codes = _stack_codes(codes, offset, num_tokens, source)  # (n, n_crops, L)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab_size:
        row = offset + int(np.argwhere((codes < 0) | (codes >= vocab_size))[0][0])
        raise ValueError(
            f"{source} has codes outside [0, {vocab_size}) (the model's vocab_size), first at row {row}: values in "
            f"[{low}, {high}]. The data was encoded with another tokenizer; re-tokenize or fix vocab_size."
        )
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source} has non-integer labels (dtype {labels.dtype}); store class ids as integers.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = offset + int(bad[0])
        raise ValueError(
            f"{source} has labels outside [0, {num_classes}) (the model's num_classes), first at row {row}: "
            f"label {int(labels[bad[0]])}. Use a model config with num_classes > {int(labels.max())}, or fix the "
            "labels."
        )


def _stack_codes(codes, offset, num_tokens, source) -> np.ndarray:
    try:
        array = np.asarray(codes)
        if array.dtype == object:
            raise ValueError
    except ValueError:  # ragged rows
        array = None
    if array is None or array.ndim not in (2, 3) or array.shape[-1] != num_tokens:
        for i, row in enumerate(codes):
            shape = np.asarray(row).shape
            if len(shape) not in (1, 2) or shape[-1] != num_tokens:
                raise ValueError(
                    f"{source} row {offset + i} has codes of shape {shape}; the model expects (n_crops, {num_tokens}) "
                    f"or ({num_tokens},): {num_tokens} tokens per crop (grid_height x grid_width). Tokenize at the "
                    "resolution the model was configured for, or fix the model config's grid."
                )
        array = np.stack([np.asarray(row).reshape(-1, num_tokens) for row in codes])
    if array.dtype.kind not in "iu":
        raise ValueError(f"{source} has non-integer codes (dtype {array.dtype}); codes must be VQ indices.")
    return array.reshape(array.shape[0], -1, num_tokens)


# ------------------------------------------------------------------------------------------------ batches


def collate_token_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of `{"codes", "label"}` -> `{"codes": LongTensor (B, n_crops, L), "labels": LongTensor (B,)}`, plus
    `"controls": ByteTensor (B, n_crops, H, W)` when the rows carry condition maps."""
    codes = [torch.as_tensor(np.asarray(row["codes"]), dtype=torch.long) for row in rows]
    codes = torch.stack([c.reshape(-1, c.shape[-1]) for c in codes])  # (B, n_crops, L)
    labels = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)  # (B,)
    batch = {"codes": codes, "labels": labels}
    if rows and "control" in rows[0]:
        batch["controls"] = torch.stack([torch.as_tensor(np.asarray(row["control"], dtype=np.uint8)) for row in rows])
    return batch


class ShuffledBatchSampler:
    """Per-process batches of an endless, epoch-by-epoch shuffled stream of row indices.

    Epoch `e` is `randperm(num_samples)` from a generator seeded by `(seed, e)`; the epochs are concatenated into one
    stream, and micro-batch `m` takes stream positions `[m * B * P, (m + 1) * B * P)`, of which process `r` keeps
    `[r * B, (r + 1) * B)`. So the order depends only on the seed, the batch size and the process count, every process
    sees a different slice, and a resumed run restarts at any micro-batch with `start_batch`.

    Args:
        num_samples (`int`): rows in the dataset.
        batch_size (`int`): rows per process per micro-batch.
        num_processes (`int`), process_index (`int`): the data-parallel layout.
        seed (`int`): seed of the epoch permutations.
        start_batch (`int`, *optional*, defaults to 0): first micro-batch to yield.
        num_batches (`int`, *optional*): micro-batches to yield (endless when None).
    """

    def __init__(
        self, num_samples, batch_size, num_processes=1, process_index=0, seed=0, start_batch=0, num_batches=None
    ):
        if num_samples < 1:
            raise ValueError("Cannot sample batches from an empty dataset.")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.start_batch, self.num_batches = start_batch, num_batches
        self._epoch, self._permutation = None, None

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._permutation = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._permutation

    def batch_indices(self, batch: int) -> list[int]:
        global_batch = self.batch_size * self.num_processes
        start = batch * global_batch + self.process_index * self.batch_size
        indices = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.num_samples)
            indices.append(int(self.epoch_permutation(epoch)[offset]))
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while self.num_batches is None or batch < self.start_batch + self.num_batches:
            yield self.batch_indices(batch)
            batch += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("An endless ShuffledBatchSampler has no length; pass num_batches.")
        return self.num_batches


def token_dataloader(
    dataset,
    batch_size: int,
    num_processes: int = 1,
    process_index: int = 0,
    seed: int = 0,
    start_batch: int = 0,
    num_batches: int | None = None,
    columns: Sequence[str] = ("codes", "label"),
    num_workers: int = 0,
    pin_memory: bool = False,
):
    """A `DataLoader` of this process's micro-batches ([`ShuffledBatchSampler`]) of `dataset`'s `columns`, collated by
    [`collate_token_batch`]: what training reads (`columns` adds "control" for ControlARPG)."""
    sampler = ShuffledBatchSampler(
        len(dataset), batch_size, num_processes, process_index, seed, start_batch, num_batches
    )
    return torch.utils.data.DataLoader(
        dataset.with_format("numpy", columns=list(columns)),
        batch_sampler=sampler,
        collate_fn=collate_token_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
