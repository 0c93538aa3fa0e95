from __future__ import annotations

import pytest

from shared import topics
from shared.topics import DeviceChannel, TopicError


@pytest.mark.parametrize("channel", list(DeviceChannel))
def test_device_topic_round_trips(channel: DeviceChannel) -> None:
    topic = topics.device_topic("edge-01", channel)
    assert topic == f"autodl/v1/devices/edge-01/{channel.value}"
    parsed = topics.parse(topic)
    assert (parsed.kind, parsed.subject, parsed.channel) == ("device", "edge-01", channel)


def test_release_topic_round_trips() -> None:
    topic = topics.release_topic("digits")
    assert topic == "autodl/v1/models/digits/releases"
    assert topics.parse(topic).subject == "digits"


def test_wildcards_cover_every_device() -> None:
    assert topics.device_wildcard(DeviceChannel.TELEMETRY) == "autodl/v1/devices/+/telemetry"
    assert topics.release_wildcard() == "autodl/v1/models/+/releases"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev ice", ".hidden", "x" * 129, "é"])
def test_ids_that_would_break_the_topic_tree_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.device_topic(bad, DeviceChannel.DESIRED)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/a/desired",
        "autodl/v1/devices/a/unknown",
        "autodl/v1/devices/a",
        "autodl/v1/models/m/x",
    ],
)
def test_parse_refuses_topics_outside_the_layout(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)
