"""The SQLite outbox: sequence numbers, ack-then-delete, the bound and its drop order, restarts."""

from __future__ import annotations

from pathlib import Path

from agent.store import Store
from agent.telemetry import Telemetry, percentile


def points(n: int, start: int = 0) -> list[tuple[str, str, float, dict[str, str]]]:
    return [("2026-01-01T00:00:00+00:00", "cpu_percent", float(start + i), {}) for i in range(n)]


def test_sequence_numbers_grow_and_survive_acks_and_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    assert store.enqueue_telemetry(points(3)) == [1, 2, 3]
    store.ack_telemetry([1, 2, 3])
    assert store.next_telemetry(10) == []
    store.close()
    store = Store(tmp_path / "a.db")  # numbers are never reused, even after every row left
    assert store.enqueue_telemetry(points(2)) == [4, 5]
    assert [seq for seq, _ in store.next_telemetry(1)] == [4]
    stats = store.outbox_stats()
    assert (stats.telemetry_pending, stats.last_telemetry_seq, stats.dropped) == (2, 5, 0)


def test_unacknowledged_rows_stay_after_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    store.enqueue_telemetry(points(5))
    store.enqueue_message("results", '{"x": 1}')
    store.ack_telemetry([1, 2])
    store.close()  # no ack for the rest: a crash before PUBACK
    again = Store(tmp_path / "a.db")
    assert [seq for seq, _ in again.next_telemetry(10)] == [3, 4, 5]
    assert [m.payload for m in again.next_messages()] == ['{"x": 1}']
    assert again.outbox_stats().bytes > 0


def test_the_bound_drops_the_oldest_telemetry_first_and_counts_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    store.enqueue_message("results", '{"result": "kept"}' * 50)
    store.enqueue_message("reported", '{"state": 1}', retain=True)
    store.enqueue_telemetry(points(10))
    row_size = store.outbox_stats().bytes
    store.outbox_max_bytes = row_size + 5 * 80  # room for about 5 more points
    store.enqueue_telemetry(points(10, start=10))
    stats = store.outbox_stats()
    assert stats.dropped > 0
    assert stats.bytes <= store.outbox_max_bytes
    kept = [seq for seq, _ in store.next_telemetry(100)]
    # The newest survive, the oldest went, in order; the messages were never touched.
    assert kept == list(range(21 - len(kept), 21))
    assert stats.dropped == 20 - len(kept)
    assert [m.channel for m in store.next_messages()] == ["results", "reported"]


def test_messages_are_never_dropped_even_past_the_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    store.outbox_max_bytes = 100
    for i in range(20):
        store.enqueue_message("results", f'{{"n": {i}, "pad": "{"x" * 50}"}}')
    assert len(store.next_messages(100)) == 20
    assert store.outbox_stats().dropped == 0


def test_a_newer_reported_state_replaces_an_unsent_older_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    store.enqueue_message("reported", "old", retain=True, replace=True)
    store.enqueue_message("results", "r1")
    store.enqueue_message("reported", "new", retain=True, replace=True)
    assert [(m.channel, m.payload) for m in store.next_messages()] == [("results", "r1"), ("reported", "new")]


def test_command_ids_are_claimed_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    assert store.claim_command("c1") is True
    assert store.claim_command("c1") is False
    store.close()
    assert Store(tmp_path / "a.db").claim_command("c1") is False


def test_serving_telemetry_uses_the_rollout_analysis_names(tmp_path: Path) -> None:
    telemetry = Telemetry(tmp_path)
    for ms in range(1, 101):
        telemetry.observe("lin", "1.0.0", ms / 1000, ok=ms % 10 != 0)
    got = {(name, labels.get("model"), labels.get("version")): value for name, value, labels in telemetry.collect()}
    assert got[("requests", "lin", "1.0.0")] == 100
    assert got[("errors", "lin", "1.0.0")] == 10
    assert got[("latency_p95_ms", "lin", "1.0.0")] == 95
    assert got[("latency_p99_ms", "lin", "1.0.0")] == 99
    assert got[("latency_p50_ms", "lin", "1.0.0")] == 50
    assert ("memory_used_bytes", None, None) in got
    # The next interval starts empty.
    assert not any(name == "requests" for name, _, _ in telemetry.collect())
    text = telemetry.prometheus([("outbox_bytes", "gauge", "Outbox size", [({}, 3.0)])])
    assert 'autodl_agent_requests_total{model="lin",version="1.0.0"} 100' in text
    assert 'autodl_agent_request_errors_total{model="lin",version="1.0.0"} 10' in text
    assert 'autodl_agent_request_duration_seconds_bucket{le="+Inf",model="lin",version="1.0.0"} 100' in text
    assert "autodl_agent_outbox_bytes 3.0" in text
    assert "# TYPE autodl_agent_memory_used_ratio gauge" in text  # device gauges in base units
    assert percentile([], 95) == 0.0
