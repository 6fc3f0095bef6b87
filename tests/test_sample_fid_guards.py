"""pipelines/sample_fid.py guards: absurd sample counts are refused up front, nothing grows with the number of samples,
and the .npz / PNGs / leftovers of killed runs are handled atomically."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_sample_fid import ROOT, load_script

sample_fid = load_script("sample_fid")


class Progress:
    def __init__(self):
        self.n = 0

    def update(self, count):
        self.n += count


def settings_for(classes=(3, 7), per_class=2, size=(8, 8)):
    return {
        "classes": list(classes),
        "num_samples_per_class": per_class,
        "num_samples": len(classes) * per_class,
        "image_size": list(size),
    }


def write_pngs(out: Path, count: int, size=(8, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    os.makedirs(out / "samples", exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(sample_fid.sample_path(str(out), index))
    return images


def test_an_absurd_number_of_samples_is_refused_in_one_line_within_seconds(tmp_path):
    out = tmp_path / "new" / "samples-1e9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "sample_fid.py"),
        "--output_dir",
        str(out),
        "--num_samples_per_class",
        "1000000000",
    ]
    # A child's peak RSS starts from its parent's at fork: a small launcher process runs the job, so that this
    # (large) test process does not count, and reports the job's own status and peak.
    launcher = (
        "import os, subprocess, sys\n"
        "process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "_, status, usage = os.wait4(process.pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)\n"  # ru_maxrss: KiB on Linux
    )
    start = time.monotonic()
    with open(tmp_path / "stderr", "w+") as stderr:
        result = subprocess.run(
            [sys.executable, "-c", launcher, *command], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr
        )
        stderr.seek(0)
        text = stderr.read()
    elapsed = time.monotonic() - start
    returncode, peak_rss = (int(value) for value in result.stdout.split())
    assert result.returncode == 0 and returncode == 1, text[-3000:]
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert [line for line in text.splitlines() if "error" in line.lower()] == [last]
    assert last.startswith("pipelines/sample_fid.py: error: 10,000,000,000 samples (1,000,000,000 per class x 10 ")
    assert "on disk" in last and "free. Lower --num_samples_per_class" in last
    assert elapsed < 60 and peak_rss < 1.5e9, (elapsed, peak_rss)  # the model and torch, nothing per sample
    assert not (tmp_path / "new").exists()  # nothing created: not even the parent of --output_dir
    print(f"\nrefused in {elapsed:.1f} s, peak RSS {peak_rss / 1e6:.0f} MB")


def test_the_disk_estimate_counts_the_npz_and_the_pngs_still_to_draw(tmp_path, monkeypatch):
    settings = settings_for(per_class=50, size=(32, 32))  # 100 samples
    from arpg_hf.metrics.sample_batch import npz_size

    npz = npz_size(sample_fid.npz_arrays(settings))
    assert 100 * (32 * 32 * 3 + 8) < npz < 100 * (32 * 32 * 3 + 8) + 4096
    free = {"bytes": npz + 100 * 32 * 32 * 3}  # not enough for the PNGs' worst case too

    class Usage:
        def __init__(self, path):
            self.free = free["bytes"]

    monkeypatch.setattr(sample_fid.shutil, "disk_usage", Usage)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"100 samples \(50 per class x 2 classes\) of 32x32 px need about 633.0 KB on "
        r"disk \(309.5 KB for samples.npz, up to 323.5 KB for the PNGs still to "
        r"draw\), but .* has 616.7 KB free",
    ):
        sample_fid.check_disk_space(str(out), settings)
    write_pngs(out, 60, size=(32, 32))  # a resumed run: the PNGs already drawn need no new space
    free["bytes"] = npz + 40 * (32 * 32 * 3 + 32 + 3 + 128)
    sample_fid.check_disk_space(str(out), settings)
    free["bytes"] -= 1
    with pytest.raises(ValueError, match="PNGs still to draw"):
        sample_fid.check_disk_space(str(out), settings)


def test_the_png_bound_holds_for_noise(tmp_path):
    """The worst case of PNG compression: uniform noise does not compress; the bound must still hold."""
    images = write_pngs(tmp_path, 3, size=(64, 48))
    raw = images[0].nbytes
    for index in range(3):
        assert os.path.getsize(sample_fid.sample_path(str(tmp_path), index)) <= raw + 64 + raw // 1000 + 128


def test_main_refuses_before_creating_the_output_folder(tmp_path, monkeypatch):
    from arpg_hf.memory import InsufficientMemoryError

    out = tmp_path / "out"
    args = sample_fid.parse_args(["--output_dir", str(out), "--num_samples_per_class", "1000000000"])
    with pytest.raises(ValueError, match="on disk"):
        sample_fid.main(args)
    assert not out.exists()
    monkeypatch.setenv("ARPG_HF_MAX_MEMORY", "1KB")  # a batch that does not fit: refused before anything is created
    with pytest.raises(InsufficientMemoryError, match=r"ARPG_HF_MAX_MEMORY=1KB"):
        sample_fid.main(sample_fid.parse_args(["--output_dir", str(out), "--num_samples_per_class", "1"]))
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        sample_fid.main(sample_fid.parse_args(["--output_dir", str(tmp_path / "file")]))


def test_batches_labels_and_seeds_are_computed_lazily(tmp_path):
    progress = Progress()
    huge = range(1, 10**12, 2)  # a second process's share of 10**12 samples: nothing is built per sample
    start = time.monotonic()
    batches = sample_fid.pending_batches(str(tmp_path), huge, 4, progress)
    assert next(batches) == [1, 3, 5, 7] and next(batches) == [9, 11, 13, 15]
    assert time.monotonic() - start < 1.0
    assert sample_fid.sample_class(list(range(1000)), 10**9, 999 * 10**9 + 5) == 999
    assert sample_fid.sample_class([3, 7], 2, 1) == 3 and sample_fid.sample_class([3, 7], 2, 2) == 7
    write_pngs(tmp_path, 3)  # finished samples are skipped and counted as done
    progress = Progress()
    assert list(sample_fid.pending_batches(str(tmp_path), range(6), 2, progress)) == [[3, 4], [5]]
    assert progress.n == 3


def test_the_npz_is_written_image_by_image_and_equals_np_savez(tmp_path):
    settings = settings_for()
    images = write_pngs(tmp_path, 4)
    path = sample_fid.write_npz(str(tmp_path), settings)
    with np.load(path) as batch:
        assert np.array_equal(batch["arr_0"], images) and batch["arr_1"].tolist() == [3, 3, 7, 7]
        assert batch["arr_0"].dtype == np.uint8 and batch["arr_1"].dtype == np.int64
    np.savez(tmp_path / "reference.npz", arr_0=images, arr_1=np.array([3, 3, 7, 7]))
    assert os.path.getsize(path) == os.path.getsize(tmp_path / "reference.npz")


def test_a_failing_npz_write_leaves_the_previous_npz_and_no_visible_temporary(tmp_path):
    settings = settings_for()
    write_pngs(tmp_path, 4)
    path = sample_fid.write_npz(str(tmp_path), settings)
    before = Path(path).read_bytes()
    png = Path(sample_fid.sample_path(str(tmp_path), 2))
    png.write_bytes(png.read_bytes()[:30])  # damaged after the first .npz
    with pytest.raises(ValueError, match=r"000002\.png cannot be read \(.*\); delete it and rerun"):
        sample_fid.write_npz(str(tmp_path), settings)
    assert Path(path).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["samples", "samples.npz"]  # the partial .npz is gone
    png.unlink()
    with pytest.raises(ValueError, match=r"000002\.png is missing; rerun the same command"):
        sample_fid.write_npz(str(tmp_path), settings)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(png)
    with pytest.raises(ValueError, match=r"000002\.png is 8x9 px, but the samples are 8x8"):
        sample_fid.write_npz(str(tmp_path), settings)


def test_a_png_whose_write_fails_never_appears(tmp_path, monkeypatch):
    """A PNG interrupted while being written (here: an error half-way) is never visible under its final name."""
    os.makedirs(tmp_path / "samples")
    settings = {
        "output_dir": str(tmp_path),
        "classes": [0],
        "num_samples_per_class": 2,
        "seed": 0,
        "num_inference_steps": 1,
        "guidance_scale": 1.0,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
    }

    class Pipe:
        def __call__(self, labels, **kwargs):
            return type("Output", (), {"images": [Image.new("RGB", (8, 8)) for _ in labels]})()

    def failing_save(self, fp, format=None, **params):
        with open(fp, "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sample_fid.sample_indices(Pipe(), [[0, 1]], settings, Progress())
    assert os.listdir(tmp_path / "samples") == []


def test_leftovers_of_killed_runs_are_removed_and_samples_kept(tmp_path):
    out = tmp_path / "out"
    write_pngs(out, 2)
    leftovers = [
        out / "samples" / ".000002.png.partial-k2j3.png",
        out / ".samples.npz.partial-abc.npz",
        out / ".sampling_settings.json.partial-1.json",
        out / "samples" / "000003.png.tmp.png",
        out / "samples.npz.tmp-77.npz",
        out / "sampling_settings.json.tmp-77",
    ]  # the last 3: old names
    for path in leftovers:
        path.write_bytes(b"half")
    (out / "notes.tmp.txt").write_text("not ours")
    sample_fid.remove_leftovers(str(out))
    assert not any(path.exists() for path in leftovers)
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000001.png"] and (out / "notes.tmp.txt").exists()


def test_settings_are_written_atomically_and_resume_check_reads_them(tmp_path):
    path = tmp_path / "sampling_settings.json"
    sample_fid.write_json(str(path), {"seed": 1})
    assert json.loads(path.read_text()) == {"seed": 1} and os.listdir(tmp_path) == ["sampling_settings.json"]
