"""pipelines/tokenize_dataset.py and pipelines/import_npy_tokens.py on tiny image folders and the tiny VQ tokenizer."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf.token_dataset import TokenDatasetInfo, augment_image, images_to_tensor, load_token_dataset, load_vq_model

from .conftest import TWO_PROCESS_LAUNCH

ROOT = Path(__file__).resolve().parents[1]
TINY_PIPELINE = str(ROOT / "tests" / "fixtures" / "tiny-arpg-pipeline")  # VQ: downsample 2, 16 codes


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tokenize_dataset = load_script("tokenize_dataset")
import_npy_tokens = load_script("import_npy_tokens")


def make_image_folder(root, classes=("cat", "dog", "fish"), per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            size = (10 + i, 12)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def run_tokenize(*argv):
    args = tokenize_dataset.parse_args([str(a) for a in argv])
    tokenize_dataset.main(args)
    return args


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    images = make_image_folder(tmp_path_factory.mktemp("images"))
    out = tmp_path_factory.mktemp("tokens")
    run_tokenize(
        "--image_dir",
        images,
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        out,
        "--resolution",
        8,
        "--ten_crop",
        "--shard_size",
        4,
        "--batch_size",
        3,
    )
    return images, out


def test_tokenized_rows_equal_direct_encoding(tokens):
    images, out = tokens
    dataset, info = load_token_dataset(out)
    assert (info.grid_height, info.grid_width, info.codebook_size, info.n_crops) == (4, 4, 16, 10)
    assert info.class_names == ["cat", "dog", "fish"] == dataset.features["label"].names
    assert len(dataset) == 6 and sorted(os.listdir(out / "data")) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    vqvae = load_vq_model(TINY_PIPELINE).eval()
    row = dataset.with_format("numpy")[5]  # fish/1.png
    views = augment_image(Image.open(images / "fish" / "1.png"), 8, ten_crop=True, flip=True)
    with torch.no_grad():
        expected = vqvae.encode(images_to_tensor(views)).indices.flatten(1)  # (10, 16)
    assert row["label"] == 2 and np.array_equal(row["codes"], expected.numpy())
    assert dataset.features["codes"].dtype == "int16"


def test_finished_shards_are_kept_when_resuming(tokens):
    images, out = tokens
    kept, redone = out / "data" / "train-00000-of-00002.parquet", out / "data" / "train-00001-of-00002.parquet"
    before = redone.read_bytes()
    stamp = kept.stat().st_mtime_ns
    redone.unlink()
    run_tokenize(
        "--image_dir",
        images,
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        out,
        "--resolution",
        8,
        "--ten_crop",
        "--shard_size",
        4,
    )
    assert kept.stat().st_mtime_ns == stamp
    assert load_token_dataset(out)[0].with_format("numpy")[4:]["codes"].tolist() == load_parquet_codes(before)


def load_parquet_codes(data):
    import io

    import pyarrow.parquet as pq

    return [np.asarray(c).tolist() for c in pq.read_table(io.BytesIO(data)).column("codes").to_pylist()]


def test_verify_decodes_stored_codes(tokens, capsys):
    _, out = tokens
    run_tokenize("--verify", "--output_dir", out, "--num_verify", 3)
    assert Image.open(out / "verify.png").size == (2 * 8, 3 * 8)  # 3 rows x (view, flipped view)
    assert "Decoded 3 rows" in capsys.readouterr().out


def test_evaluation_mode_has_one_view(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=1)
    out = tmp_path / "t"
    run_tokenize("--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", out, "--resolution", 8, "--no_flip")
    info = TokenDatasetInfo.load(tmp_path / "t")
    assert info.n_crops == 1 and info.augmentation == "center"


def test_raw_images_without_a_tokenizer_are_rejected(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a",), per_class=1)
    with pytest.raises(ValueError, match="needs the VQ tokenizer: pass --vqvae"):
        run_tokenize("--image_dir", images, "--output_dir", tmp_path / "t", "--resolution", 8)


def test_resolution_must_fit_the_tokenizer(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a",), per_class=1)
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsample factor 2"):
        run_tokenize("--image_dir", images, "--vqvae", TINY_PIPELINE, "--output_dir", tmp_path / "t", "--resolution", 7)


def test_import_npy_layout(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for label in (0, 1, 10):  # numeric folders are the labels themselves (and sort numerically)
        os.makedirs(tmp_path / "npy" / str(label))
        for i in range(2):
            codes = rng.integers(0, 16384, (1, 2, 256)).astype(np.int64)
            np.save(tmp_path / "npy" / str(label) / f"{i}.npy", codes)
            expected[(label, i)] = codes[0]
    args = import_npy_tokens.parse_args(
        [
            "--npy_dir",
            str(tmp_path / "npy"),
            "--output_dir",
            str(tmp_path / "t"),
            "--class_names",
            "imagenet",
            "--shard_size",
            "4",
        ]
    )
    import_npy_tokens.main(args)
    dataset, info = load_token_dataset(tmp_path / "t")
    assert (info.grid_height, info.grid_width, info.codebook_size, info.n_crops) == (16, 16, 16384, 2)
    assert len(info.class_names) == 1000 and dataset.features["label"].names[1] == info.class_names[1]
    rows = dataset.with_format("numpy")[:]
    assert rows["label"].tolist() == [0, 0, 1, 1, 10, 10]
    assert np.array_equal(rows["codes"][4], expected[(10, 0)])


def test_import_rejects_inconsistent_files(tmp_path):
    os.makedirs(tmp_path / "npy" / "0")
    np.save(tmp_path / "npy" / "0" / "a.npy", np.zeros((1, 2, 256), np.int64))
    np.save(tmp_path / "npy" / "0" / "b.npy", np.zeros((1, 2, 255), np.int64))
    args = import_npy_tokens.parse_args(["--npy_dir", str(tmp_path / "npy"), "--output_dir", str(tmp_path / "t")])
    with pytest.raises(ValueError, match=r"b.npy: codes of shape \(2, 255\)"):
        import_npy_tokens.main(args)


@pytest.mark.slow  # two processes
def test_two_processes_split_the_shards_and_write_the_same_rows(tokens, tmp_path):
    images, single = tokens
    out = tmp_path / "ddp"
    command = [
        *TWO_PROCESS_LAUNCH,
        str(ROOT / "pipelines" / "tokenize_dataset.py"),
        "--image_dir",
        str(images),
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        str(out),
        "--resolution",
        "8",
        "--ten_crop",
        "--shard_size",
        "2",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(os.listdir(out / "data")) == 3
    expected, got = load_token_dataset(single)[0], load_token_dataset(out)[0]
    assert expected["label"] == got["label"]
    assert np.array_equal(expected.with_format("numpy")[:]["codes"], got.with_format("numpy")[:]["codes"])


def timed_run(command, folder: Path, pattern: str, env) -> tuple[float, float]:
    """Runs `command` to the end; returns when the first file matching `pattern` appeared under `folder` (the start-up
    time: imports, loading) and the whole run time, in seconds."""
    import time

    start, first = time.monotonic(), None
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        if first is None and folder.is_dir() and any(not p.name.startswith(".") for p in folder.glob(pattern)):
            first = time.monotonic() - start
        time.sleep(0.02)
    assert process.returncode == 0, process.stderr.read()[-3000:]
    total = time.monotonic() - start
    return (first if first is not None else total), total


@pytest.mark.slow  # ~40 s: one timed run, 3 runs killed at random times (ARPG_HF_FAULT_INJECTION_RUNS), one rerun
def test_killed_runs_never_leave_a_half_written_file_and_a_rerun_finishes_identically(tmp_path):
    import pyarrow.parquet as pq

    from tests import fault_injection

    images = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=80)  # 241 shards of 1 image
    (images / "b" / "zz.png").write_text("not an image")  # skipped: its record is written beside the shards
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"

    def command(out):
        return [
            sys.executable,
            str(ROOT / "pipelines" / "tokenize_dataset.py"),
            "--image_dir",
            str(images),
            "--vqvae",
            TINY_PIPELINE,
            "--output_dir",
            str(out),
            "--resolution",
            "8",
            "--ten_crop",
            "--shard_size",
            "1",
            "--skip_bad_images",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]

    def shards():
        # Visible shards only (pathlib's glob also matches hidden names: the staging files of a killed run).
        return sorted(p for p in (out / "data").glob("*.parquet") if not p.name.startswith(".")) if out.is_dir() else []

    def unreadable_shards():  # fault_injection reads no parquet: every visible shard must read completely
        broken = []
        for shard in shards():
            try:
                pq.read_table(shard)
            except Exception as error:  # noqa: BLE001
                broken.append(f"{shard.name}: {type(error).__name__}: {error}")
        return broken

    startup, duration = timed_run(command(tmp_path / "reference"), tmp_path / "reference" / "data", "*.parquet", env)
    # Kills uniformly in [0, start-up + half the writing], in the same folder: each run resumes the last, and the
    # writing outlasts any one run, so that kills keep landing among the writes.
    max_delay = startup + 0.5 * (duration - startup)
    report = fault_injection.random_kills(
        command(out),
        out,
        runs=fault_injection.kill_runs(3),
        max_delay=max_delay,
        env=env,
        cwd=ROOT,
        count_outputs=lambda: len(shards()),
        check=unreadable_shards,
    )
    print(
        f"\ntokenize_dataset: {report.kills} kills ({report.kills_during_writes} while shards were being written), "
        f"{report.finished} runs finished first, {len(report.half_written)} half-written files; "
        f"start-up {startup:.1f} s of {duration:.1f} s, shards written per run {[n for _, n in report.written]}"
    )
    assert report.half_written == []
    subprocess.run(command(out), env=env, check=True, capture_output=True, timeout=240, cwd=ROOT)
    assert [str(p.relative_to(out)) for p in out.rglob(".*")] == []  # the leftovers of the killed runs are gone
    expected, got = load_token_dataset(tmp_path / "reference"), load_token_dataset(out)
    assert expected[1] == got[1] and len(got[0]) == 240
    assert expected[0]["label"] == got[0]["label"]
    assert np.array_equal(expected[0].with_format("numpy")[:]["codes"], got[0].with_format("numpy")[:]["codes"])
    assert (out / "skipped_images.json").read_text() == (tmp_path / "reference" / "skipped_images.json").read_text()
