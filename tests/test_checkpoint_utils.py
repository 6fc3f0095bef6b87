import pickle

import pytest
import torch
from safetensors.torch import save_file

from arpg_hf.conversion.checkpoints import KeyRule, convert_state_dict, load_reference_state_dict


class _Exploit:
    """Unpickling this would run code (create a file); a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_dict_forms(tmp_path):
    tensors = {"a.weight": torch.ones(2), "b.weight": torch.zeros(3)}
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in tensors.items()}}, tmp_path / "wrapped.pt")
    save_file(tensors, tmp_path / "plain.safetensors")
    for source in (tmp_path / "wrapped.pt", str(tmp_path / "plain.safetensors"), {"state_dict": tensors}, tensors):
        loaded = load_reference_state_dict(source)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_unsafe_truncated_and_missing_files_give_one_clear_error(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "exploit.pt").write_bytes(pickle.dumps({"model": _Exploit(str(marker))}))
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_reference_state_dict(tmp_path / "exploit.pt")
    assert not marker.exists()
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated"):
        load_reference_state_dict(tmp_path / "truncated.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_reference_state_dict(tmp_path / "nowhere.pt")
    with pytest.raises(TypeError, match="expected a tensor"):
        load_reference_state_dict({"model": {"w": "not a tensor"}})


def test_key_map_reports_every_problem_at_once():
    rules = [KeyRule("blocks.{}.w", "layers.{}.weight", transform=lambda t: t * 2), KeyRule("head", "lm_head.weight")]
    converted = convert_state_dict(
        {"blocks.0.w": torch.ones(1), "head": torch.ones(1)}, rules, ["layers.0.weight", "lm_head.weight"]
    )
    assert converted["layers.0.weight"].item() == 2
    with pytest.raises(ValueError) as error:
        convert_state_dict(
            {"blocks.0.w": torch.ones(1), "stray": torch.ones(1), "skip": torch.ones(1)},
            rules,
            ["layers.0.weight", "layers.1.weight", "lm_head.weight"],
            ignored_source_keys=["skip"],
        )
    message = str(error.value)
    assert "stray" in message and "layers.1.weight" in message and "lm_head.weight" in message
    assert "skip" not in message
    with pytest.raises(ValueError, match="same number"):
        KeyRule("a.{}.b", "a.b")
