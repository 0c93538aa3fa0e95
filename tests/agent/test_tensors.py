"""agent.tensors: OIP JSON bodies read and answers written exactly, bad bodies named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.tensors import InvalidInputError, encode_response, loads


def _answer_data(array: np.ndarray) -> list[object]:
    body, header_length = encode_response({"model_name": "m"}, {"y": array}, frozenset())
    assert header_length is None
    out = json.loads(body)["outputs"][0]
    assert out["shape"] == list(array.shape)
    return list(out["data"])


def test_every_float32_in_an_answer_reads_back_as_the_same_value() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.normal(size=2000).astype(np.float32) * np.float32(10) ** rng.integers(-30, 30, 2000).astype(np.float32),
        np.array([0.0, -0.0, 1.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -3.4e38], np.float32),
    ]).reshape(1, -1, 1)  # fmt: skip
    back = np.asarray(_answer_data(values), np.float32)
    assert back.tobytes() == values.ravel().tobytes()  # bit for bit, signed zero too


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[1, -2], [2**62, 0]], np.int64), [1, -2, 2**62, 0]),
        (np.array([True, False]), [True, False]),
        (np.array([0.5, 1.5], np.float16), [0.5, 1.5]),
        (np.array(["a", "é"], dtype=object), ["a", "é"]),
        (np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2], [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]),  # not contiguous
    ],
)
def test_answers_hold_each_dtype_flat_in_row_major_order(array: np.ndarray, expected: list[object]) -> None:
    assert _answer_data(array) == expected


def test_non_finite_outputs_are_written_as_the_json_module_writes_them() -> None:
    data = _answer_data(np.array([1.0, np.nan, np.inf, -np.inf], np.float32))
    assert data[0] == 1.0 and np.isnan(data[1]) and data[2:] == [np.inf, -np.inf]  # type: ignore[operator]


def test_bodies_are_read_strictly_and_faults_named() -> None:
    assert loads(b'{"inputs": [{"data": [1.5, 2, "x"]}]}') == {"inputs": [{"data": [1.5, 2, "x"]}]}
    assert loads(bytearray(b'["\\ud800"]')) == ["\ud800"]  # a lone surrogate escape: the json module reads it
    assert loads('{"a": 1}'.encode("utf-16")) == {"a": 1}  # JSON in UTF-16, as the json module detects it
    for body, message in [
        (b"[NaN]", "NaN is not a JSON number"),
        (b"[1, Infinity]", "Infinity is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[" + b"9" * 5000 + b"]", "body is not JSON"),
        (b'{"a": 1', "body is not JSON"),
        (b"\xff\xfe\xfd", "body is not JSON"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            loads(body)
