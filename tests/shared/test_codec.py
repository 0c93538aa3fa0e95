from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydantic import BaseModel

from shared.codec import ProtocolError, decode, encode
from shared.messages import (
    Command,
    CommandName,
    DesiredState,
    EnrollRequest,
    TelemetryBatch,
)
from tests.support.wire_examples import EXAMPLES, NOW


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: BaseModel) -> None:
    data = encode(message)
    assert decode(data) == message
    assert decode(data, type(message)) == message


def test_telemetry_batch_knows_its_first_seq() -> None:
    batch = EXAMPLES[4]
    assert isinstance(batch, TelemetryBatch)
    assert batch.first_seq == 0


def test_command_expiry() -> None:
    cmd = Command(id="c", device_id="d", name=CommandName.PING, expires_at=NOW)
    assert cmd.expired(NOW)
    assert not cmd.expired(NOW - timedelta(seconds=1))


def _desired_obj() -> dict[str, object]:
    obj: dict[str, object] = json.loads(encode(EXAMPLES[0]))
    return obj


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed"),
        (encode(EXAMPLES[0])[:-7], "malformed"),  # truncated
        (b"\xff\xfe\x00", "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b'"a string"', "malformed"),
        (json.dumps({**_desired_obj(), "schema_version": 2}).encode(), "schema_version"),
        (
            json.dumps({k: v for k, v in _desired_obj().items() if k != "schema_version"}).encode(),
            "schema_version",
        ),
        (json.dumps({**_desired_obj(), "kind": "launch_missiles"}).encode(), "unknown_kind"),
        (json.dumps({**_desired_obj(), "revision": "three"}).encode(), "invalid"),
        (json.dumps({**_desired_obj(), "revision": -1}).encode(), "invalid"),
        (json.dumps({**_desired_obj(), "unexpected": 1}).encode(), "invalid"),
        (
            json.dumps({**_desired_obj(), "models": {"a/b": {"version": "1.0.0", "manifest_url": "u"}}}).encode(),
            "invalid",
        ),
        (
            json.dumps({**_desired_obj(), "models": {"m": {"version": "one", "manifest_url": "u"}}}).encode(),
            "invalid",
        ),
    ],
)
def test_bad_payloads_raise_protocol_error_naming_the_cause(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(payload)
    assert err.value.reason == reason


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(b" " * 300_000)
    assert err.value.reason == "too_large"
    with pytest.raises(ProtocolError) as err:
        decode(encode(EXAMPLES[0]), max_bytes=10)
    assert err.value.reason == "too_large"


def test_a_message_of_another_kind_is_refused() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(encode(EXAMPLES[5]), DesiredState)
    assert err.value.reason == "wrong_kind"
    assert "DesiredState" in str(err.value)


def test_field_errors_name_the_field() -> None:
    bad = json.dumps({**_desired_obj(), "revision": "three"}).encode()
    with pytest.raises(ProtocolError, match="revision"):
        decode(bad, DesiredState)


def test_plain_models_decode_without_kind() -> None:
    req = EnrollRequest(token="t" * 20, labels={"site": "a"})
    assert decode(encode(req), EnrollRequest) == req
    with pytest.raises(ProtocolError) as err:
        decode(b'{"token": ""}', EnrollRequest)
    assert err.value.reason == "invalid"
