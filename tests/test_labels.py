"""Tests for the shipped ImageNet-1k class names (arpg_hf.labels)."""

from __future__ import annotations

import pytest

from arpg_hf.labels import (
    IMAGENET_NUM_CLASSES,
    build_label2id,
    get_label_ids,
    imagenet_id2label,
)


@pytest.fixture(scope="module")
def label2id() -> dict[str, int]:
    return build_label2id(imagenet_id2label())


def test_id2label_has_1000_nonempty_entries() -> None:
    id2label = imagenet_id2label()
    assert IMAGENET_NUM_CLASSES == 1000
    assert sorted(id2label) == list(range(1000))
    assert all(isinstance(v, str) and v and v == v.strip() for v in id2label.values())


@pytest.mark.parametrize(
    ("index", "label"),
    [
        (0, "tench, Tinca tinca"),
        (1, "goldfish, Carassius auratus"),
        (207, "golden retriever"),
        (281, "tabby, tabby cat"),
        (360, "otter"),
        (999, "toilet tissue, toilet paper, bathroom tissue"),
    ],
)
def test_spot_checks(index: int, label: str) -> None:
    assert imagenet_id2label()[index] == label


def test_id2label_returns_fresh_copy() -> None:
    first = imagenet_id2label()
    first[0] = "changed"
    assert imagenet_id2label()[0] == "tench, Tinca tinca"


def test_synonym_lookup(label2id: dict[str, int]) -> None:
    assert get_label_ids("tabby cat", label2id) == [281]
    assert get_label_ids("tabby", label2id) == [281]
    assert get_label_ids("golden retriever", label2id) == [207]
    assert get_label_ids("otter", label2id) == [360]
    assert get_label_ids("Tinca tinca", label2id) == [0]
    assert get_label_ids("bathroom tissue", label2id) == [999]


def test_list_input_keeps_order(label2id: dict[str, int]) -> None:
    assert get_label_ids(["tabby cat", "golden retriever", "otter"], label2id) == [281, 207, 360]
    assert get_label_ids([], label2id) == []


def test_classes_reachable_by_name(label2id: dict[str, int]) -> None:
    # Every class but three has a synonym that resolves to it; 86 ("partridge"),
    # 517 ("crane") and 594 ("harp") only have names shared with a lower id.
    assert set(range(1000)) - set(label2id.values()) == {86, 517, 594}


def test_shared_synonyms_resolve_to_lowest_id(label2id: dict[str, int]) -> None:
    assert label2id["crane"] == 134  # also 517
    assert label2id["maillot"] == 638  # also a synonym of 639
    assert label2id["tank suit"] == 639
    assert build_label2id({5: "b, a", 2: "a"}) == {"a": 2, "b": 5}


def test_unknown_label_error_suggests_matches(label2id: dict[str, int]) -> None:
    with pytest.raises(ValueError) as excinfo:
        get_label_ids(["otter", "tabby kat"], label2id)
    message = str(excinfo.value)
    assert "'tabby kat'" in message
    assert "'tabby cat'" in message
    assert "sorted(label2id)" in message


def test_unknown_label_without_close_match(label2id: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="not a known class label"):
        get_label_ids("zzzzqqqq", label2id)
