"""Label sets: the default semantic-location categories and checks for any label list."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_LABELS: list[str] = [
    "home", "school", "workplace", "restaurant", "shopping",
    "hospital", "transport", "scenic", "gym", "entertainment",
]

DISPLAY_NAMES: dict[str, str] = {
    "home": "家",
    "school": "学校",
    "workplace": "公司/办公室",
    "restaurant": "餐厅",
    "shopping": "商场",
    "hospital": "医院",
    "transport": "车站/机场",
    "scenic": "公园/景区",
    "gym": "健身房",
    "entertainment": "电影院/KTV",
}


class LabelError(ValueError):
    """A label list is malformed, or a value is not in it."""


def display_name(label: str) -> str:
    """The Chinese display name of a default label; other labels display as themselves."""
    return DISPLAY_NAMES.get(label, label)


def check_labels(labels: Sequence[str], where: str = "label list", allow_empty: bool = False) -> list[str]:
    """Return ``labels`` as a list after checking they are unique non-empty strings."""
    if isinstance(labels, str):
        raise LabelError(f"{where} must be a list of labels, got the string {labels!r}")
    labels = list(labels)
    if not labels and not allow_empty:
        raise LabelError(f"{where} is empty")
    bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
    if bad:
        raise LabelError(f"{where} holds non-string or blank labels: {bad[:5]!r}")
    seen: set[str] = set()
    dupes = [x for x in labels if x in seen or seen.add(x)]
    if dupes:
        raise LabelError(f"{where} repeats labels: {sorted(set(dupes))!r}")
    return labels
