"""Token datasets: augmentation, the on-disk format, validation with clear errors, and the batch order."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf.token_dataset import (
    ShuffledBatchSampler,
    TokenDatasetInfo,
    augment_image,
    check_token_dataset,
    collate_token_batch,
    five_crops,
    images_to_tensor,
    load_token_dataset,
    resize_and_center_crop,
    token_features,
)

from .conftest import tiny_config


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def token_rows(num_rows, n_crops=2, num_tokens=16, vocab_size=32, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab_size, (num_rows, n_crops, num_tokens)).astype(np.int16)
    labels = rng.integers(0, num_classes, num_rows)
    features = token_features(n_crops, num_tokens, [f"class {i}" for i in range(num_classes)], vocab_size)
    return datasets.Dataset.from_dict({"codes": codes, "label": labels}, features=features)


# ----------------------------------------------------------------------------------------------- augmentation


def test_resize_and_center_crop_keeps_an_image_of_the_target_size():
    image = random_image(8, 8)
    assert np.array_equal(np.asarray(resize_and_center_crop(image, 8)), np.asarray(image))
    assert resize_and_center_crop(random_image(40, 30), 8).size == (8, 8)


def test_five_crops_are_corners_and_centre():
    image = random_image(10, 12)
    pixels = np.asarray(image)
    crops = [np.asarray(c) for c in five_crops(image, 6)]
    assert np.array_equal(crops[0], pixels[:6, :6])
    assert np.array_equal(crops[1], pixels[:6, -6:])
    assert np.array_equal(crops[2], pixels[-6:, :6])
    assert np.array_equal(crops[3], pixels[-6:, -6:])
    assert np.array_equal(crops[4], pixels[2:8, 3:9])


@pytest.mark.parametrize(
    "ten_crop, flip, expected", [(True, True, 10), (True, False, 5), (False, True, 2), (False, False, 1)]
)
def test_augment_image_view_counts_and_flips(ten_crop, flip, expected):
    views = augment_image(random_image(20, 26), 8, ten_crop=ten_crop, flip=flip)
    assert len(views) == expected and all(v.size == (8, 8) and v.mode == "RGB" for v in views)
    if flip:
        half = expected // 2
        # the flipped image's top-left crop mirrors the original's top-right crop; the centres mirror each other
        mirrored = 1 if ten_crop else 0
        assert np.array_equal(np.asarray(views[half]), np.asarray(views[mirrored])[:, ::-1])


def test_images_to_tensor_range_and_layout():
    image = Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8))
    pixels = images_to_tensor([image])
    assert pixels.shape == (1, 3, 1, 1)
    assert torch.allclose(pixels.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


# ----------------------------------------------------------------------------------------------- format


def test_info_round_trip_and_parquet_load(tmp_path):
    info = TokenDatasetInfo(
        grid_height=4,
        grid_width=4,
        codebook_size=32,
        n_crops=2,
        resolution=64,
        class_names=["a", "b"],
        vqvae="x",
        augmentation="center+flip",
        num_samples=3,
    )
    (tmp_path / "data").mkdir()
    token_rows(3, num_classes=2).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    info.save(tmp_path)
    dataset, loaded = load_token_dataset(tmp_path)
    assert loaded == info and len(dataset) == 3
    assert dataset.features["label"].names == ["class 0", "class 1"]
    assert dataset.features["codes"].shape == (2, 16)


def test_loading_an_image_folder_says_to_tokenize_first(tmp_path):
    (tmp_path / "cat").mkdir()
    random_image(8, 8).save(tmp_path / "cat" / "0.png")
    with pytest.raises(ValueError, match="(?s)holds images, not tokens.*tokenize_dataset.py"):
        load_token_dataset(tmp_path)


def test_collate_shapes():
    rows = [{"codes": np.full((2, 16), i, np.int16), "label": 3 - i} for i in range(2)]
    batch = collate_token_batch(rows)
    assert batch["codes"].shape == (2, 2, 16) and batch["codes"].dtype == torch.long
    assert batch["codes"][1].eq(1).all() and batch["labels"].tolist() == [3, 2]
    single_view = collate_token_batch([{"codes": np.arange(16), "label": 0}])  # (tokens,) rows: one view
    assert single_view["codes"].shape == (1, 1, 16)


# ----------------------------------------------------------------------------------------------- validation


def test_a_valid_dataset_passes():
    check_token_dataset(token_rows(10), None, tiny_config(), codebook_size=32)


def test_empty_dataset_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        check_token_dataset(token_rows(0), None, tiny_config())


def test_wrong_code_length_is_rejected():
    with pytest.raises(ValueError, match=r"codes of shape \(2, 15\).*\(n_crops, 16\)"):
        check_token_dataset(token_rows(3, num_tokens=15), None, tiny_config())


def test_ragged_code_rows_are_rejected():
    rows = datasets.Dataset.from_dict({"codes": [[1] * 16, [1] * 9], "label": [0, 0]})
    with pytest.raises(ValueError, match=r"row 1 has codes of shape \(9,\)"):
        check_token_dataset(rows, None, tiny_config())


def test_codes_outside_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match=r"codes outside \[0, 32\)"):
        check_token_dataset(token_rows(3, vocab_size=40, seed=1), None, tiny_config())


def test_labels_outside_the_class_range_are_rejected():
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\).*num_classes"):
        check_token_dataset(token_rows(30, num_classes=9), None, tiny_config())


def test_missing_columns_are_rejected():
    with pytest.raises(ValueError, match="lacks the column"):
        check_token_dataset(token_rows(3).rename_column("label", "class"), None, tiny_config())


def test_grid_and_codebook_mismatch_are_rejected():
    info = TokenDatasetInfo(grid_height=8, grid_width=2, codebook_size=32, n_crops=2)
    with pytest.raises(ValueError, match="8x2 grid.*expects 4x4"):
        check_token_dataset(token_rows(3), info, tiny_config())
    with pytest.raises(ValueError, match="tokenizer has 64 codes"):
        check_token_dataset(token_rows(3), None, tiny_config(), codebook_size=64)


def test_sharded_scan_covers_every_row():
    rows = token_rows(10, num_classes=9, seed=3)  # some labels >= 5
    bad = [i for i, label in enumerate(rows["label"]) if label >= 5]
    found = []
    for index in range(2):
        try:
            check_token_dataset(rows, None, tiny_config(), shard=(index, 2), chunk_size=2)
        except ValueError as error:
            found.append(error)
    assert bad and found and any(f"row {bad[0]}" in str(e) for e in found)


# ----------------------------------------------------------------------------------------------- batch order


def test_batches_split_between_processes_and_cover_each_epoch():
    samplers = [ShuffledBatchSampler(12, 3, num_processes=2, process_index=r, seed=5, num_batches=4) for r in range(2)]
    batches = [list(s) for s in samplers]
    for step in range(4):
        assert not set(batches[0][step]) & set(batches[1][step])  # different rows on each process
    epoch_one = sorted(i for step in range(2) for r in range(2) for i in batches[r][step])
    assert epoch_one == list(range(12))  # each row once per epoch


def test_batches_resume_exactly_and_depend_on_the_seed():
    full = list(ShuffledBatchSampler(7, 3, seed=1, num_batches=10))
    resumed = list(ShuffledBatchSampler(7, 3, seed=1, start_batch=6, num_batches=4))
    assert resumed == full[6:]
    assert full != list(ShuffledBatchSampler(7, 3, seed=2, num_batches=10))
