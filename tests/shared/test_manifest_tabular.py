"""Tabular preprocessing carries the category lists a device needs to encode string columns."""

from __future__ import annotations

from shared.manifest import Preprocessing


def test_tabular_categories_round_trip() -> None:
    pre = Preprocessing(type="tabular", features=["age", "city"], categories={"city": ["Oslo", "Rome"]})
    again = Preprocessing.model_validate_json(pre.model_dump_json())
    assert again.categories == {"city": ["Oslo", "Rome"]}
    assert again.categories["city"].index("Rome") == 1


def test_categories_are_optional() -> None:
    assert Preprocessing.model_validate({"type": "tabular", "features": ["a"]}).categories is None
