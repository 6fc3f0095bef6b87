"""pipelines/sample_fid.py on the bundled digits model: outputs, settings JSON, resume, and a 2-process run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import TWO_PROCESS_LAUNCH

pytestmark = pytest.mark.slow  # not in the fast run (-m 'not slow'): sampling subprocesses, ~20 s

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_fid = load_script("sample_fid")
ARGS = ["--num_samples_per_class", "2", "--class_ids", "3", "7", "--batch_size", "1", "--num_inference_steps", "4"]


def test_seeds_and_classes_depend_on_the_global_index_only():
    seeds = [sample_fid.sample_seed(0, i) for i in range(1000)] + [sample_fid.sample_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and sample_fid.sample_seed(0, 5) == seeds[5]
    assert sample_fid.sample_seed(1, 0) != sample_fid.sample_seed(0, 1)  # no seed + index collisions
    assert [sample_fid.sample_class([3, 7], 2, i) for i in range(4)] == [3, 3, 7, 7]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid") / "single"
    settings = sample_fid.main(sample_fid.parse_args(["--output_dir", str(out), *ARGS]))
    return out, settings


def test_writes_pngs_adm_npz_and_every_setting(single_run):
    out, _ = single_run
    assert sorted(os.listdir(out / "samples")) == [f"{i:06d}.png" for i in range(4)]
    with np.load(out / "samples.npz") as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [3, 3, 7, 7]
    settings = json.loads((out / "sampling_settings.json").read_text())
    assert settings["num_samples"] == 4 and settings["classes"] == [3, 7] and settings["class_names"] == ["3", "7"]
    assert settings["num_inference_steps"] == 4 and settings["seed"] == 0 and settings["image_size"] == [32, 32]
    assert settings["scheduler"]["token_schedule"] in ("arccos", "cosine")
    assert isinstance(settings["guidance_scale"], float) and settings["temperature"] == 1.0


def test_resume_redraws_only_missing_samples_identically(single_run):
    out, _ = single_run
    with np.load(out / "samples.npz") as batch:
        before = batch["arr_0"].copy()
    kept = out / "samples" / "000000.png"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "samples" / "000002.png").unlink()
    sample_fid.main(sample_fid.parse_args(["--output_dir", str(out), *ARGS]))
    assert kept.stat().st_mtime_ns == kept_mtime  # finished samples are not redone
    with np.load(out / "samples.npz") as batch:
        assert np.array_equal(batch["arr_0"], before)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
        sample_fid.main(sample_fid.parse_args(["--output_dir", str(out), *ARGS, "--seed", "1"]))


def test_two_processes_draw_the_same_samples(single_run, tmp_path):
    out, _ = single_run
    command = [
        *TWO_PROCESS_LAUNCH,
        str(ROOT / "pipelines" / "sample_fid.py"),
        "--output_dir",
        str(tmp_path / "ddp"),
        *ARGS,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "ddp" / "sampling_settings.json").read_text())["num_processes"] == 2
    with np.load(out / "samples.npz") as single, np.load(tmp_path / "ddp" / "samples.npz") as ddp:
        assert np.array_equal(single["arr_0"], ddp["arr_0"]) and np.array_equal(single["arr_1"], ddp["arr_1"])


evaluate_pipeline = load_script("evaluate_samples")


def test_evaluate_pipeline_scores_samples_against_a_reference_batch(single_run, tmp_path):
    from arpg_hf.metrics import TinyRandomFeatureExtractor, extract_features, inception_score

    out, settings = single_run
    with np.load(out / "samples.npz") as batch:
        images = batch["arr_0"]
    np.savez(tmp_path / "ref.npz", arr_0=images)  # the samples as their own reference: FID 0, precision = recall = 1
    args = evaluate_pipeline.parse_args(
        [
            "--samples",
            str(out),
            "--reference",
            str(tmp_path / "ref.npz"),
            "--feature_extractor",
            "tiny-random",
            "--output",
            str(tmp_path / "metrics.json"),
            "--name",
            "digits",
        ]
    )
    report = evaluate_pipeline.main(args)
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    metrics = report["metrics"]
    assert metrics["fid"] < 1e-6 and (metrics["precision"], metrics["recall"]) == (1.0, 1.0)
    logits = extract_features(images, TinyRandomFeatureExtractor())["logits"]
    assert metrics["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-9)
    assert report["sampling_settings"]["seed"] == settings["seed"] and report["fid_reference"] == "reference images"
    assert report["markdown_row"] == f"| digits | 4 | 0.00 | {metrics['inception_score']:.1f} | 1.000 | 1.000 |"


def test_evaluate_pipeline_without_inception_weights_offline_is_a_clear_error(single_run, tmp_path):
    out, _ = single_run
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"}
    env.pop("ARPG_HF_INCEPTION_WEIGHTS", None)
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "evaluate_samples.py"),
        "--samples",
        str(out / "samples.npz"),
        "--reference",
        str(tmp_path / "ref.npz"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    assert "process is offline" in result.stderr and "ARPG_HF_INCEPTION_WEIGHTS" in result.stderr


def test_killed_runs_never_leave_a_half_written_file_and_a_rerun_finishes_identically(tmp_path):
    """Runs killed at random times in one folder (3, or ARPG_HF_FAULT_INJECTION_RUNS; each resumes the last), then one
    to the end: no visible PNG, npz or JSON is ever incomplete, and the result equals an uninterrupted run (batch size
    1: bit for bit)."""
    from tests import fault_injection
    from tests.test_tokenize_dataset import timed_run

    args = ["--num_samples_per_class", "6", "--batch_size", "1", "--num_inference_steps", "4"]  # 10 classes: 60
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, str(ROOT / "pipelines" / "sample_fid.py"), "--output_dir", str(out), *args]

    out = tmp_path / "killed"

    def pngs():
        # Visible PNGs only (pathlib's glob also matches hidden names: the staging files of a killed run).
        return sum(not p.name.startswith(".") for p in (out / "samples").glob("*.png")) if out.is_dir() else 0

    reference = tmp_path / "reference"
    startup, duration = timed_run(command(reference), reference / "samples", "*.png", env)
    max_delay = startup + 0.6 * (duration - startup)  # the drawing outlasts one run: kills keep landing among writes
    report = fault_injection.random_kills(
        command(out), out, runs=fault_injection.kill_runs(3), max_delay=max_delay, env=env, cwd=ROOT, count_outputs=pngs
    )
    print(
        f"\nsample_fid: {report.kills} kills ({report.kills_during_writes} while PNGs were being written), "
        f"{report.finished} runs finished first, {len(report.half_written)} half-written files; start-up "
        f"{startup:.1f} s of {duration:.1f} s, PNGs written per run {[n for _, n in report.written]}"
    )
    assert report.half_written == []
    subprocess.run(command(out), env=env, check=True, capture_output=True, timeout=240, cwd=ROOT)
    assert [str(p.relative_to(out)) for p in out.rglob(".*")] == []  # the leftovers of the killed runs are gone
    assert sorted(os.listdir(out / "samples")) == [f"{i:06d}.png" for i in range(60)]
    with np.load(reference / "samples.npz") as expected, np.load(out / "samples.npz") as got:
        assert np.array_equal(expected["arr_0"], got["arr_0"]) and np.array_equal(expected["arr_1"], got["arr_1"])
    settings = [json.loads((folder / "sampling_settings.json").read_text()) for folder in (reference, out)]
    assert [{k: s[k] for k in sample_fid.IMAGE_SETTINGS} for s in settings] == 2 * [
        {k: settings[0][k] for k in sample_fid.IMAGE_SETTINGS}
    ]
