"""benchmarks/quantization_agreement.py on a tiny saved pipeline, and its offline skip for missing published weights."""

import importlib.util
from pathlib import Path

import pytest

from .conftest import get_dummy_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quantization_agreement.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("quantization_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_logit_agreement_of_each_quantization(script, tmp_path):
    get_dummy_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    records = script.main(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--batch-size",
            "2",
            "--num-inference-steps",
            "4",
            "--json",
            str(tmp_path / "a.json"),
        ]
    )
    assert [r["quantization"] for r in records] == ["int8", "int8-weight-only", "int4-weight-only"]
    for record in records:
        assert record["positions"] == 2 * 16
        assert 0 < record["max_abs_logit_difference"] and 0 < record["mean_kl"] <= record["max_kl"]
        assert 0.5 <= record["greedy_agreement"] <= 1
    weight_only = {r["quantization"]: r["mean_kl"] for r in records}
    assert weight_only["int8-weight-only"] < weight_only["int4-weight-only"]  # 8 bits stay closer than 4
    assert (tmp_path / "a.json").is_file()


def test_missing_published_weights_are_skipped_offline(script, capsys):
    assert script.main(["--model", "nobody/arpg-missing", "--quantization", "int8"]) == []
    assert capsys.readouterr().out.startswith("skipped: 'nobody/arpg-missing' is not available here")
