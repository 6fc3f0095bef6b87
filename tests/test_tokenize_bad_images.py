"""pipelines/tokenize_dataset.py on folders with unreadable images: one line naming the file, or --skip_bad_images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from arpg_hf.token_dataset import UnreadableImageError, load_token_dataset, read_image
from tests.conftest import TWO_PROCESS_LAUNCH
from tests.test_tokenize_dataset import TINY_PIPELINE, make_image_folder, run_tokenize, tokenize_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "pipelines" / "tokenize_dataset.py")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def truncate(path: Path) -> None:
    """Cuts a valid PNG in half: PIL opens it, and fails while decoding ("image file is truncated")."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_bad_folder(root: Path, empty: bool = False) -> Path:
    """a/0.png a/1.png (truncated) b/0.png b/1.png [b/empty.png (0 bytes)] b/x.png (text): rows in sorted file order."""
    make_image_folder(root, classes=("a", "b"), per_class=2)
    truncate(root / "a" / "1.png")
    (root / "b" / "x.png").write_text("this is not a PNG\n")
    if empty:
        (root / "b" / "empty.png").write_bytes(b"")
    return root


def tokenize_command(images, out, *extra):
    cache = str(Path(out).parent / "cache")
    return [
        sys.executable,
        SCRIPT,
        "--image_dir",
        str(images),
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        str(out),
        "--resolution",
        "8",
        "--shard_size",
        "2",
        "--cache_dir",
        cache,
        *extra,
    ]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_a_bad_image_stops_the_job_with_one_line_naming_it(tmp_path):
    images = make_bad_folder(tmp_path / "images")  # rows: a/0 a/1 (truncated) b/0 b/1 b/x (text)
    out = tmp_path / "tokens"
    result = subprocess.run(tokenize_command(images, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0] == result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert lines[0].startswith("pipelines/tokenize_dataset.py: error: Cannot read image ")
    assert f"{images / 'a' / '1.png'} (row 1 of the sorted file list)" in lines[0]
    assert "truncated" in lines[0] and "--skip_bad_images" in lines[0]
    assert not os.path.exists(out / "tokenizer_info.json") and not os.path.exists(out / "skipped_images.json")


def test_skip_bad_images_finishes_and_lists_both(tmp_path, capsys):
    images = make_bad_folder(tmp_path / "images")
    out = tmp_path / "tokens"
    tokenize_dataset.main(tokenize_dataset.parse_args(tokenize_command(images, out, "--skip_bad_images")[2:]))
    assert "Skipped 2 unreadable image(s) of 5" in capsys.readouterr().err
    skipped = json.loads((out / "skipped_images.json").read_text())
    assert skipped["num_skipped"] == 2 and skipped["num_source_images"] == 5
    assert [(r["row"], r["path"]) for r in skipped["images"]] == [
        (1, str(images / "a" / "1.png")),
        (4, str(images / "b" / "x.png")),
    ]
    assert "truncated" in skipped["images"][0]["reason"] and "UnidentifiedImageError" in skipped["images"][1]["reason"]
    dataset, info = load_token_dataset(out)
    assert len(dataset) == info.num_samples == 3 and dataset["label"] == [0, 1, 1]  # a/0, b/0, b/1


def test_read_image_names_the_reason_and_never_accepts_truncated_files(tmp_path):
    images = make_bad_folder(tmp_path / "images", empty=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert read_image({"path": str(images / "a" / "0.png"), "bytes": None}).size == (12, 10)
    for name, reason in (("a/1.png", "truncated"), ("b/x.png", "UnidentifiedImageError"), ("b/empty.png", "0 bytes")):
        with pytest.raises(UnreadableImageError, match=reason):
            read_image({"path": str(images / name), "bytes": None})
        with pytest.raises(UnreadableImageError, match=reason):
            read_image({"path": name, "bytes": (images / name).read_bytes()})  # an image embedded in a dataset
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_in_process_error_and_skip_with_an_empty_file(tmp_path, capsys):
    images = make_bad_folder(tmp_path / "images", empty=True)  # rows: a/0 a/1 b/0 b/1 b/empty b/x
    out = tmp_path / "tokens"
    argv = ["--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8, "--no_flip"]
    with pytest.raises(UnreadableImageError, match=r"a/1\.png \(row 1 of the sorted file list\): OSError: image file"):
        run_tokenize(*argv)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on to get past a bad file
    run_tokenize(*argv, "--skip_bad_images", "--shard_size", 2, "--batch_size", 1)
    skipped = json.loads((out / "skipped_images.json").read_text())
    assert [(r["row"], os.path.basename(r["path"])) for r in skipped["images"]] == [
        (1, "1.png"),
        (4, "empty.png"),
        (5, "x.png"),
    ]
    assert "Skipped 3 unreadable image(s) of 6" in capsys.readouterr().err
    dataset, info = load_token_dataset(out)
    assert len(dataset) == info.num_samples == 3
    assert sorted(os.listdir(out / "skipped")) == ["train-00000-of-00003.json", "train-00002-of-00003.json"]

    # Resuming: a redone shard rewrites its record; shards that are kept keep theirs; the merged list is the same.
    os.remove(out / "data" / "train-00002-of-00003.parquet")
    run_tokenize(*argv, "--skip_bad_images", "--shard_size", 2)
    assert json.loads((out / "skipped_images.json").read_text()) == skipped
    # The rows with the same settings but without --skip_bad_images: the kept shards still say what they left out.
    run_tokenize(*argv, "--shard_size", 2)
    assert json.loads((out / "skipped_images.json").read_text()) == skipped


def test_a_source_without_any_readable_image_is_refused(tmp_path):
    images = tmp_path / "images"
    os.makedirs(images / "a")
    (images / "a" / "0.png").write_text("text")
    (images / "a" / "1.png").write_bytes(b"")
    out = tmp_path / "tokens"
    with pytest.raises(ValueError, match=r"None of the 2 source images could be read"):
        run_tokenize(
            "--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8, "--skip_bad_images"
        )
    assert not (out / "tokenizer_info.json").exists()


def test_a_non_image_column_is_refused_before_anything_is_written(tmp_path):
    import datasets

    source = tmp_path / "source"
    datasets.Dataset.from_dict({"image": ["a", "b"], "label": [0, 1]}).save_to_disk(str(source))
    out = tmp_path / "tokens"
    with pytest.raises(ValueError, match=r"column 'image' holds Value values, not images; set --image_column"):
        run_tokenize("--dataset_name", source, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8)
    assert not out.exists()


def test_bad_images_in_a_dataset_are_named_by_row(tmp_path):
    import datasets

    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(good)
    good_bytes = good.read_bytes()
    rows = {"image": [{"path": None, "bytes": good_bytes}, {"path": None, "bytes": good_bytes[:40]}], "label": [0, 0]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    source = tmp_path / "source"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(source))
    out = tmp_path / "tokens"
    with pytest.raises(UnreadableImageError, match=r"Cannot read image row 1 of the dataset: "):
        run_tokenize("--dataset_name", source, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8)
    run_tokenize(
        "--dataset_name", source, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8, "--skip_bad_images"
    )
    assert [r["row"] for r in json.loads((out / "skipped_images.json").read_text())["images"]] == [1]
    assert len(load_token_dataset(out)[0]) == 1


def test_shards_of_another_shard_count_are_refused_and_incomplete_folders_do_not_load(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a",), per_class=3)
    out = tmp_path / "tokens"
    argv = ["--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8]
    run_tokenize(*argv, "--shard_size", 1)
    with pytest.raises(
        ValueError, match=r"holds shards of another run \(train-00000-of-00003.parquet.*\(--shard_size 2\)"
    ):
        run_tokenize(*argv, "--shard_size", 2)
    os.remove(out / "data" / "train-00001-of-00003.parquet")  # as a killed run leaves it
    with pytest.raises(ValueError, match=r"incomplete: 1 of 3 shards are missing \(train-00001-of-00003.parquet\)"):
        load_token_dataset(out)


def test_leftovers_of_killed_runs_are_removed_and_other_files_kept(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a",), per_class=2)
    out = tmp_path / "tokens"
    os.makedirs(out / "data")
    leftovers = [
        out / "data" / ".train-00000-of-00001.parquet.partial-abc123.parquet",
        out / ".tokenizer_info.json.partial-x1y2.json",
        out / "data" / "train-00000-of-00001.parquet.tmp-99",
        out / "tokenizer_info.json.tmp",
    ]  # the last two: names of earlier versions
    for path in leftovers:
        path.write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    run_tokenize("--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8)
    assert not any(path.exists() for path in leftovers)
    assert (out / "notes.txt").read_text() == "mine" and len(load_token_dataset(out)[0]) == 2


def test_nothing_is_created_before_the_arguments_are_validated(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a",), per_class=1)
    out = tmp_path / "tokens"
    for argv in (["--resolution", 7, "--vqvae", TINY_PIPELINE], ["--resolution", 8]):
        with pytest.raises(ValueError):
            run_tokenize("--image_dir", images, "--output_dir", out, *argv)
    with pytest.raises(ValueError, match="is not a folder"):
        run_tokenize(
            "--image_dir", tmp_path / "nothing", "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8
        )
    assert not out.exists()


@pytest.mark.slow  # two processes
def test_two_processes_agree_on_the_skipped_images(tmp_path):
    images = make_bad_folder(tmp_path / "images", empty=True)  # 3 bad rows (1, 4, 5) in shards 0 and 2 of 3
    single = tmp_path / "single"
    run_tokenize(
        "--image_dir",
        images,
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        single,
        "--resolution",
        8,
        "--shard_size",
        2,
        "--skip_bad_images",
    )
    out = tmp_path / "ddp"
    command = [
        *TWO_PROCESS_LAUNCH,
        *tokenize_command(images, out, "--skip_bad_images")[1:],
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "skipped_images.json").read_text()) == json.loads(
        (single / "skipped_images.json").read_text()
    )
    expected, got = load_token_dataset(single)[0], load_token_dataset(out)[0]
    assert expected["label"] == got["label"] and len(got) == 3
    assert np.array_equal(expected.with_format("numpy")[:]["codes"], got.with_format("numpy")[:]["codes"])


def test_parse_args_has_the_flag():
    args = tokenize_dataset.parse_args(["--image_dir", "x", "--output_dir", "y", "--skip_bad_images"])
    assert args.skip_bad_images
