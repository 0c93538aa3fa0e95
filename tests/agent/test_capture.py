"""Hard-example capture on the agent: the policy's rules, the bounded spool, upload once after being offline."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from agent.capture import QUEUE_ITEMS, Capture, Spool, http_uploader, judge
from shared.capture import CaptureBatch, CaptureItem, CapturePolicy, CaptureReason, CaptureResult, item_id
from shared.manifest import Manifest, Sample, TensorData, TensorSpec


def _manifest(lineage: dict[str, object] | None = None) -> Manifest:
    return Manifest(
        name="digits",
        version="1.0.0",
        task="image-classification",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 3])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 3])],
        labels=["a", "b", "c"],
        sample=Sample(
            inputs={"x": TensorData(dtype="float32", shape=[1, 3], data=[0, 0, 0])},
            outputs={"logits": TensorData(dtype="float32", shape=[1, 3], data=[0, 0, 0])},
        ),
        lineage=lineage or {},
    )


@pytest.mark.parametrize(
    ("policy", "probs", "ood", "draw", "expected"),
    [
        (CapturePolicy(min_confidence=0.6), [0.5, 0.3, 0.2], None, 0.9, CaptureReason.LOW_CONFIDENCE),
        (CapturePolicy(min_confidence=0.6), [0.9, 0.05, 0.05], None, 0.9, None),
        (CapturePolicy(min_margin=0.2), [0.55, 0.45, 0.0], None, 0.9, CaptureReason.SMALL_MARGIN),
        (CapturePolicy(min_margin=0.2), [0.7, 0.3, 0.0], None, 0.9, None),
        (CapturePolicy(max_ood_score=3.0), [0.9, 0.1, 0.0], 4.5, 0.9, CaptureReason.OUT_OF_DISTRIBUTION),
        (CapturePolicy(max_ood_score=3.0), [0.9, 0.1, 0.0], 1.0, 0.9, None),
        (CapturePolicy(max_ood_score=3.0), [0.9, 0.1, 0.0], None, 0.9, None),  # no reference in the manifest
        (CapturePolicy(sample_rate=0.1), [0.9, 0.1, 0.0], None, 0.05, CaptureReason.SAMPLE),
        (CapturePolicy(sample_rate=0.1), [0.9, 0.1, 0.0], None, 0.5, None),
        (CapturePolicy(enabled=False), [0.3, 0.3, 0.4], None, 0.0, None),
    ],
)
def test_policy_rules(
    policy: CapturePolicy, probs: list[float], ood: float | None, draw: float, expected: CaptureReason | None
) -> None:
    assert judge(policy, np.array(probs), ood, lambda: draw) == expected


def test_a_policy_without_any_rule_or_out_of_range_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs min_confidence"):
        CapturePolicy()
    with pytest.raises(ValidationError):
        CapturePolicy(min_confidence=1.5)
    with pytest.raises(ValidationError):
        CapturePolicy(sample_rate=0.1, unknown=True)  # type: ignore[call-arg]


def _item(content: bytes) -> CaptureItem:
    """A sampled digits 1.0.0 item of `content`."""
    return CaptureItem(
        id=item_id(content, "digits", "1.0.0"),
        model="digits",
        version="1.0.0",
        reason=CaptureReason.SAMPLE,
        content_b64=base64.b64encode(content).decode(),
        captured_at="2026-01-01T00:00:00Z",  # type: ignore[arg-type]
    )


def _stored(spool: Spool, n: int, size: int) -> list[str]:
    ids = []
    for i in range(n):
        one = _item(json.dumps({"data": [i], "pad": "x" * size}).encode())
        spool.put(one, budget_bytes=10 * (size * 2))
        ids.append(one.id)
        time.sleep(0.002)  # distinct mtimes: the spool's order is the order of capture
    return ids


def test_the_spool_drops_the_oldest_items_past_its_budget(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ids = _stored(spool, 30, 1000)
    kept = [item.id for item in spool.oldest(100)]
    assert 5 <= len(kept) < 30
    assert kept == ids[-len(kept) :]  # the newest survive, in order
    assert spool.size_bytes() <= 10 * 2000


def test_a_spool_opened_again_holds_what_was_left_in_order(tmp_path: Path) -> None:
    items = [_item(json.dumps({"data": [i]}).encode()) for i in range(12)]
    spool = Spool(tmp_path / "spool")
    assert spool.put_many(items[:6], budget_bytes=10**6) == (6, 0)
    time.sleep(0.002)
    assert spool.put_many(items[4:10], budget_bytes=10**6) == (4, 0)  # two of them spooled already
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 2  # a batch is one file
    spool.remove([items[1].id, items[7].id, items[0].id])  # the first file is written again: keeps its place
    time.sleep(0.05)  # past the file system's coarse clock
    # A single-item file as an earlier agent wrote it is read too.
    (tmp_path / "spool" / f"{items[10].id}.json").write_bytes(items[10].model_dump_json().encode())
    again = Spool(tmp_path / "spool")
    expected = [items[i].id for i in (2, 3, 4, 5, 6, 8, 9, 10)]
    assert [one.id for one in again.oldest(100)] == expected and len(again) == 8
    again.remove(expected[:4])  # the whole first file
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
    assert [one.id for one in Spool(tmp_path / "spool").oldest(100)] == expected[4:]


def _capture(tmp_path: Path, upload: object, policy: CapturePolicy) -> Capture:
    capture = Capture(tmp_path / "capture", lambda: {"digits": policy}, upload, "cam-1", interval_s=0.05)  # type: ignore[arg-type]
    capture.start()
    return capture


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_items_captured_offline_are_uploaded_once_when_the_hub_answers(tmp_path: Path) -> None:
    hub_up = False
    received: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not hub_up:
            raise httpx.ConnectError("hub unreachable")
        assert request.headers["Authorization"] == "Bearer adt_x"
        batch = CaptureBatch.model_validate_json(request.content)
        new = [i.id for i in batch.items if i.id not in received]
        received.extend(new)
        dup = [i.id for i in batch.items if i.id not in new]
        return httpx.Response(200, json=CaptureResult(stored=new, duplicates=dup).model_dump())

    client = httpx.Client(transport=httpx.MockTransport(handler), headers={"Authorization": "Bearer adt_x"})
    capture = _capture(tmp_path, http_uploader(client, "http://hub", "cam-1"), CapturePolicy(min_confidence=0.9))
    try:
        manifest = _manifest()
        for i in range(20):
            capture.offer(manifest, json.dumps({"data": [i]}).encode(), np.array([[0.1, 0.2, 0.15]]))
        capture.offer(manifest, b'{"data": ["sure"]}', np.array([[9.0, 0.0, 0.0]]))  # confident: not kept
        _wait(lambda: capture.counters.kept == 20)
        time.sleep(0.3)
        assert len(capture.spool) == 20 and received == []
        hub_up = True
        capture.flush()
        _wait(lambda: len(capture.spool) == 0)
        assert len(received) == 20 and len(set(received)) == 20
        assert capture.counters.uploaded == 20
    finally:
        capture.stop()


def test_capture_never_blocks_the_request_path(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "c", lambda: {"digits": CapturePolicy(sample_rate=1.0)}, None, "cam-1")
    # Not started: nothing drains the queue, so offers past its bound are dropped and counted at once.
    manifest = _manifest()
    offers = QUEUE_ITEMS + 500
    started = time.monotonic()
    for i in range(offers):
        capture.offer(manifest, json.dumps({"data": [i]}).encode(), np.array([[0.3, 0.3, 0.4]]))
    assert time.monotonic() - started < 5
    assert capture.counters.queue_full == 500
    assert capture.counters.judged == 0  # judging is the capture thread's work, never the request's
    other = _manifest().model_copy(update={"name": "other"})
    capture.offer(other, b"{}", np.array([[0.3, 0.3, 0.4]]))  # no policy for this model: not even offered
    assert capture.counters.offered == offers


def test_the_queue_is_bounded_by_the_bytes_it_holds_too(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "c", lambda: {"digits": CapturePolicy(sample_rate=1.0)}, None, "cam-1")
    embedding = np.zeros((1, 1_500_000), dtype=np.float32)  # 6 MB an answer, held until judged
    for i in range(4):
        capture.offer(_manifest(), json.dumps({"data": [i]}).encode(), embedding)
    assert capture.counters.queue_full == 2  # 16 MB of offers in waiting, not 1,024 times 6 MB


def test_the_daily_cap_holds_and_a_request_captured_twice_is_kept_once(tmp_path: Path) -> None:
    saved: list[str] = []
    capture = Capture(
        tmp_path / "c",
        lambda: {"digits": CapturePolicy(sample_rate=1.0, daily_cap=10)},
        None,
        "cam-1",
        day_counts=(lambda: None, saved.append),
        gather_s=0.2,  # every item kept below arrives within one gathering: spooled as one batch
    )
    capture.start()
    try:
        manifest = _manifest()
        for _ in range(4):  # the same request four times: one item
            capture.offer(manifest, b'{"data": ["same"]}', np.array([[0.3, 0.3, 0.4]]))
        for i in range(30):
            capture.offer(manifest, json.dumps({"data": [i]}).encode(), np.array([[0.3, 0.3, 0.4]]))
        _wait(lambda: capture.counters.kept == 10)
    finally:
        capture.stop()
    assert len(capture.spool) == 10 and capture.counters.kept == 10 and capture.counters.judged == 34
    assert capture.counters.over_daily_cap == 34 - 10 - 3  # the three repeats were within the cap
    assert json.loads(saved[-1])[1] == 10  # the day's count the journal keeps across restarts


def test_the_ood_score_uses_the_training_centroid_from_the_manifest(tmp_path: Path) -> None:
    from agent.capture import scores

    manifest = _manifest({"ood": {"centroid": [1.0, 0.0, 0.0], "spread": 0.5}})
    _, near = scores(manifest, np.array([[1.0, 0.1, 0.0]]))
    logits, far = scores(manifest, np.array([[-3.0, 2.0, 1.0]]))
    assert near is not None and far is not None and near < 1.0 < 3.0 < far
    # Logits become probabilities; a row that is a distribution already stays as it is.
    np.testing.assert_allclose(logits.sum(), 1.0)
    assert logits.argmax() == 1
    np.testing.assert_allclose(scores(manifest, np.array([[0.2, 0.3, 0.5]]))[0], [0.2, 0.3, 0.5])


def test_an_output_that_is_no_scores_is_counted_and_the_server_goes_on(tmp_path: Path) -> None:
    capture = Capture(tmp_path / "c", lambda: {"digits": CapturePolicy(sample_rate=1.0)}, None, "cam-1")
    capture.start()
    try:
        capture.offer(_manifest(), b"{}", np.array([["cat", "dog"]], dtype=object))
        capture.offer(_manifest(), b"{}", np.zeros((1, 0), dtype=np.float32))
        _wait(lambda: capture.counters.unjudged == 2)
        assert capture.counters.judged == 0
        capture.offer(_manifest(), b'{"data": [1]}', np.array([[0.3, 0.3, 0.4]]))
        _wait(lambda: capture.counters.kept == 1)
        assert capture.counters.judged == 1
    finally:
        capture.stop()
