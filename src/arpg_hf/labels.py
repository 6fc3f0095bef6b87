"""ImageNet-1k class names, shipped with the package and usable offline.

This mirrors what :class:`diffusers.DiTPipeline` offers through its ``id2label``
property and :meth:`~diffusers.DiTPipeline.get_label_ids`, so class-conditional
ARPG generation can be driven by names instead of raw indices::

    >>> from arpg_hf.labels import build_label2id, get_label_ids, imagenet_id2label
    >>> id2label = imagenet_id2label()
    >>> id2label[281]
    'tabby, tabby cat'
    >>> label2id = build_label2id(id2label)
    >>> get_label_ids(["tabby cat", "golden retriever", "otter"], label2id)
    [281, 207, 360]

The names live in ``imagenet_classes.txt`` next to this module: line ``i`` is the
standard human-readable label of class ``i`` (synset-sorted order), i.e. the same
strings as the ``id2label`` of standard ImageNet classifiers and of DiT.

Duplicate names: 18 synonyms are shared by two classes (``"crane"`` is both class
134, the bird, and class 517, the machine; ``"maillot"`` is class 638 and also a
synonym of class 639 ``"maillot, tank suit"``; others include ``"missile"``,
``"panda"``, ``"tub"``, ``"harp"``). In :func:`build_label2id` a shared synonym
resolves to the lowest class id; use a more specific synonym (e.g. ``"tank suit"``
for 639) or the integer id for the other class. Three classes have no synonym of
their own and are therefore reachable only by integer id: 86 (``"partridge"``, also
a synonym of 82), 517 (``"crane"``, the machine) and 594 (``"harp"``, also a synonym of
593 "harmonica"). (``DiTPipeline`` keeps the last id instead, so there ``"crane"``
gives 517 and class 134 is unreachable by name.)
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from importlib import resources

__all__ = ["IMAGENET_NUM_CLASSES", "build_label2id", "get_label_ids", "imagenet_id2label", "model_id2label"]

IMAGENET_NUM_CLASSES = 1000
"""Number of ImageNet-1k classes."""

_CLASSES_FILE = "imagenet_classes.txt"


@lru_cache(maxsize=1)
def _load_imagenet_labels() -> tuple[str, ...]:
    text = resources.files("arpg_hf").joinpath(_CLASSES_FILE).read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(
            f"arpg_hf/{_CLASSES_FILE} should hold {IMAGENET_NUM_CLASSES} class names, "
            f"found {len(labels)}; the package data is damaged."
        )
    return labels


def imagenet_id2label() -> dict[int, str]:
    """Return the ImageNet-1k mapping ``class index -> label``.

    Labels are the standard comma-separated synonym lists, e.g. ``0 -> "tench, Tinca
    tinca"``, ``281 -> "tabby, tabby cat"``. The file is read once and cached; each call
    returns a fresh dict, so callers may modify it freely.
    """
    return dict(enumerate(_load_imagenet_labels()))


def model_id2label(config_id2label: dict | None, num_classes: int) -> dict[int, str]:
    """The class names of a model from its config's `id2label` and `num_classes`: that mapping when it names every
    class, ImageNet-1k names for a 1000-class model, the class indices as strings otherwise."""
    names = {int(k): v for k, v in (config_id2label or {}).items()}
    is_default = all(name == f"LABEL_{k}" for k, name in names.items())  # transformers' placeholder names
    if len(names) == num_classes and not is_default:
        return names
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_id2label()
    return {i: str(i) for i in range(num_classes)}


def build_label2id(id2label: dict[int, str]) -> dict[str, int]:
    """Invert ``id2label`` into a ``synonym -> class index`` lookup, like ``DiTPipeline``.

    Each label is split on ``","`` and every stripped, non-empty synonym maps to its
    class index, so ``"tabby"`` and ``"tabby cat"`` both map to 281. When a synonym
    belongs to several classes (e.g. ``"crane"``: 134 and 517), the lowest index wins,
    whatever the dict order (``DiTPipeline`` keeps the last one); a class whose every
    synonym is shared with a lower index (ImageNet: 86, 517, 594) gets no key. Keys keep
    their original case (``"Tinca tinca"``).
    """
    label2id: dict[str, int] = {}
    for class_id in sorted(id2label):
        for synonym in id2label[class_id].split(","):
            name = synonym.strip()
            if name and name not in label2id:
                label2id[name] = int(class_id)
    return label2id


def get_label_ids(label: str | list[str], label2id: dict[str, int]) -> list[int]:
    """Map one class name or a list of names to class indices.

    Args:
        label: a synonym such as ``"tabby cat"``, or a list of them. Matching is exact
            (case and spelling as in the label file).
        label2id: lookup built by :func:`build_label2id`.

    Returns:
        The class indices, one per name, in input order (a list even for one name).

    Raises:
        ValueError: if a name is unknown; the message lists the valid names when there are
            few, else close matches and how to list every valid name.
    """
    labels = [label] if isinstance(label, str) else list(label)
    unknown = [name for name in labels if name not in label2id]
    if unknown:
        message = f"{unknown[0]!r} is not a known class label. {valid_names_hint(unknown[0], label2id)}"
        if len(label2id) > MAX_LISTED_NAMES:
            message += " See all valid names with sorted(label2id) (e.g. sorted(build_label2id(imagenet_id2label())))."
        raise ValueError(message)
    return [label2id[name] for name in labels]


MAX_LISTED_NAMES = 30


def valid_names_hint(name: str, label2id: dict[str, int]) -> str:
    """What to tell someone who asked for the class `name` that `label2id` lacks: every valid name when there are
    few (a model of digits: 0-9), else the close matches."""
    names = list(label2id)
    if len(names) <= MAX_LISTED_NAMES:
        return f"Valid names: {', '.join(names)}."
    close = difflib.get_close_matches(name, names, n=5)
    matches = f"Did you mean: {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{matches}The model knows {len(names)} names."
