"""The update state machine, table-driven, with real HTTP, SQLite and ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.artifacts import ArtifactCache
from agent.config import AgentSettings, Identity
from agent.runtime import ModelRegistry
from agent.store import Slot, Store
from agent.updates import RESUME, Updater
from shared.keys import KeyChain, endorse, public_key_id
from shared.manifest import public_key_b64, sign_manifest
from shared.messages import DesiredModel, DesiredState, UpdateState
from shared.targets import TargetId
from tests.support.hubstub import HubStub
from tests.support.models import make_release
from tests.support.waiting import wait_for

S = UpdateState


class Rig:
    """An updater wired to a real store, cache and registry, talking to the hub stand-in."""

    def __init__(self, settings: AgentSettings, identity: Identity, hub: HubStub, client: httpx.Client) -> None:
        self.settings, self.identity, self.hub, self.client = settings, identity, hub, client
        self.revision = 0
        self.open()

    def open(self) -> None:
        self.store = Store(self.settings.db_path)
        self.registry = ModelRegistry()
        self.cache = ArtifactCache(self.settings.cache_dir, 4096, 0)
        self.updater = Updater(
            self.settings, self.identity, self.store, self.cache, self.registry, self.client, [TargetId.CPU_FP32], 1
        )

    def close(self) -> None:
        self.updater.stop()
        self.store.close()

    def apply(self, models: dict[str, DesiredModel]) -> None:
        self.revision += 1
        self.updater.apply(DesiredState(device_id=self.identity.device_id, revision=self.revision, models=models))

    def settle(self, timeout: float = 30) -> None:
        wait_for("the updater to settle", lambda: not self.updater.busy(), timeout)

    def serving(self, name: str) -> str | None:
        model = self.registry.get(name)
        return model.version if model else None


@pytest.fixture
def rig(settings: AgentSettings, identity: Identity, hub_stub: HubStub, client: httpx.Client) -> Iterator[Rig]:
    r = Rig(settings, identity, hub_stub, client)
    try:
        yield r
    finally:
        r.close()


def _corrupt(hub: HubStub, desired: DesiredModel, release: object) -> None:
    sha = release.sha256  # type: ignore[attr-defined]
    data = hub.artifacts[sha]
    hub.artifacts[sha] = data[:-1] + bytes([data[-1] ^ 1])


def _resign_with_other_key(hub: HubStub, desired: DesiredModel, release: object) -> None:
    signed = sign_manifest(release.manifest, Ed25519PrivateKey.generate())  # type: ignore[attr-defined]
    hub.manifests[("m", "2.0.0")] = signed.to_bytes()


def _drop_artifact(hub: HubStub, desired: DesiredModel, release: object) -> None:
    del hub.artifacts[release.sha256]  # type: ignore[attr-defined]


def _drop_manifest(hub: HubStub, desired: DesiredModel, release: object) -> None:
    del hub.manifests[("m", "2.0.0")]


# name, how v2 is built, what is done to the hub, expected state, a piece of the reason
CASES = [
    ("good", {}, None, S.ACTIVE, None),
    ("corrupted artifact", {}, _corrupt, S.ROLLED_BACK, "sha256"),
    ("smoke test fails", {"wrong_sample": True}, None, S.ROLLED_BACK, "max difference"),
    ("foreign signature", {}, _resign_with_other_key, S.ROLLED_BACK, "signed by key"),
    ("missing artifact", {}, _drop_artifact, S.ROLLED_BACK, "404"),
    ("missing manifest", {}, _drop_manifest, S.ROLLED_BACK, "404"),
    ("unknown target", {"target": TargetId.CUDA_FP16}, None, S.ROLLED_BACK, "offers targets [cuda-fp16]"),
    ("not an onnx file", {"model_bytes": b"garbage"}, None, S.ROLLED_BACK, "cannot load"),
]


@pytest.mark.parametrize(("case", "build", "sabotage", "state", "reason"), CASES, ids=[c[0] for c in CASES])
def test_update_from_v1_to_v2(
    rig: Rig,
    case: str,
    build: dict[str, object],
    sabotage: Callable[[HubStub, DesiredModel, object], None] | None,
    state: UpdateState,
    reason: str | None,
) -> None:
    v1 = rig.hub.publish(make_release(rig.hub.key, "m", "1.0.0", seed=1))
    rig.apply({"m": v1})
    rig.settle()
    assert rig.serving("m") == "1.0.0"
    release = make_release(rig.hub.key, "m", "2.0.0", seed=2, **build)  # type: ignore[arg-type]
    v2 = rig.hub.publish(release)
    if sabotage is not None:
        sabotage(rig.hub, v2, release)
    rig.apply({"m": v2})
    rig.settle()
    record = rig.store.model("m")
    assert record.state == state
    assert rig.updater.applied_revision() == 2
    if state == S.ACTIVE:
        assert rig.serving("m") == "2.0.0"
        assert record.active and record.active.version == "2.0.0"
        assert record.previous and record.previous.version == "1.0.0"
    else:
        assert rig.serving("m") == "1.0.0", "the old version keeps serving"
        assert record.active and record.active.version == "1.0.0"
        assert reason is not None and record.error is not None and reason in record.error
        assert (
            not rig.cache.has(release.sha256, release.manifest.variants[0].size)
            or case == "not an onnx file"
            or case == "smoke test fails"
        )
    states = [e.state for e in rig.store.journal("m") if e.version == "2.0.0"]
    assert states[0] == "downloading"


def test_a_rotated_key_is_followed_once_the_hub_can_say_so_and_kept(rig: Rig) -> None:
    rig.apply({"m": rig.hub.publish(make_release(rig.hub.key, "m", "1.0.0", seed=1))})
    rig.settle()
    new = Ed25519PrivateKey.generate()
    v2 = rig.hub.publish(make_release(new, "m", "2.0.0", seed=2))
    rig.hub.chain = (503, None)  # the hub cannot tell the device about the new key yet: retried, not refused
    rig.apply({"m": v2})
    wait_for("a retry", lambda: "retrying" in (rig.store.model("m").error or ""), 30)
    assert rig.serving("m") == "1.0.0"
    current = public_key_b64(new)
    rig.hub.chain = (
        200,
        KeyChain(current=public_key_id(current), current_public_key=current, endorsements=[endorse(rig.hub.key, new)]),
    )
    rig.settle()
    assert rig.serving("m") == "2.0.0" and rig.store.model("m").state == S.ACTIVE
    # Kept in the store: after a restart, with no chain to read, 2.0.0 is restored.
    rig.hub.chain = None
    rig.close()
    rig.open()
    rig.updater.recover()
    assert rig.serving("m") == "2.0.0"
    assert rig.updater.keys.status()["trusted"] == sorted(
        [public_key_id(public_key_b64(rig.hub.key)), public_key_id(current)]
    )


def test_several_models_at_once_and_removal(rig: Rig) -> None:
    a = rig.hub.publish(make_release(rig.hub.key, "a", "1.0.0", seed=1))
    b = rig.hub.publish(make_release(rig.hub.key, "b", "3.1.0", seed=3))
    rig.apply({"a": a, "b": b})
    rig.settle()
    assert (rig.serving("a"), rig.serving("b")) == ("1.0.0", "3.1.0")
    rig.apply({"b": b})
    rig.settle()
    assert rig.serving("a") is None and rig.serving("b") == "3.1.0"
    assert [r.name for r in rig.store.models()] == ["b"]


def test_a_newer_desired_state_redirects_a_download(rig: Rig) -> None:
    v2 = rig.hub.publish(make_release(rig.hub.key, "m", "2.0.0", seed=2, padding_bytes=200_000))
    v3 = rig.hub.publish(make_release(rig.hub.key, "m", "3.0.0", seed=3))
    rig.hub.hold_after = 50_000
    rig.hub.trickle = True
    rig.apply({"m": v2})
    assert rig.hub.holding.wait(10)
    rig.hub.hold_after = None
    rig.apply({"m": v3})
    rig.hub.released.set()
    rig.settle()
    assert rig.serving("m") == "3.0.0"
    journal = rig.store.journal("m")
    assert any("cancelled" in (e.detail or "") or "replaced" in (e.detail or "") for e in journal)
    assert not any(e.state == "active" and e.version == "2.0.0" for e in journal)


def test_only_a_revision_older_than_the_newest_seen_is_superseded(rig: Rig) -> None:
    me = rig.identity.device_id
    assert rig.updater.superseded(DesiredState(device_id=me, revision=1)) is None  # nothing seen yet
    rig.apply({})
    rig.apply({})
    assert rig.updater.superseded(DesiredState(device_id=me, revision=1)) == 2
    assert rig.updater.superseded(DesiredState(device_id=me, revision=2)) is None  # the same one again
    # Enrolled again under another id: the hub numbers that device's states from 1.
    assert rig.updater.superseded(DesiredState(device_id="dev-new", revision=1)) is None


def test_a_fatally_failed_version_is_not_retried(rig: Rig) -> None:
    bad = rig.hub.publish(make_release(rig.hub.key, "m", "2.0.0", seed=2, wrong_sample=True))
    rig.apply({"m": bad})
    rig.settle()
    before = len(rig.store.journal("m"))
    rig.apply({"m": bad})
    rig.settle()
    assert rig.store.model("m").state == S.ROLLED_BACK and len(rig.store.journal("m")) == before


# state the journal stopped in, the manifest bytes journaled with it -> what the restarted agent serves.
# "other" bytes are signed by the hub's key too, but are not the manifest the desired state names
# (its manifest_sha256, journaled with the update): a resumed update refuses them as a first run
# would; one that resumes downloading fetches the manifest again and checks that.
RECOVERY = [
    (S.DOWNLOADING, "as desired", "2.0.0"),
    (S.VERIFYING, "as desired", "2.0.0"),
    (S.STAGING, "as desired", "2.0.0"),
    (S.DOWNLOADING, "other", "2.0.0"),
    (S.VERIFYING, "other", "1.0.0"),
    (S.STAGING, "other", "1.0.0"),
]


def test_resume_table_never_stages_unverified_work() -> None:
    assert RESUME[S.STAGING] == S.VERIFYING and RESUME[S.DOWNLOADING] == S.DOWNLOADING
    assert all(RESUME[s] is None for s in (S.IDLE, S.ACTIVE, S.ROLLED_BACK, S.COMMITTED))


@pytest.mark.parametrize(
    ("crashed_in", "journaled", "serves"), RECOVERY, ids=[f"{s.value}-{j.replace(' ', '-')}" for s, j, _ in RECOVERY]
)
def test_after_a_crash_the_journal_resumes_the_update(
    rig: Rig, crashed_in: UpdateState, journaled: str, serves: str
) -> None:
    v1 = rig.hub.publish(make_release(rig.hub.key, "m", "1.0.0", seed=1), pin=True)
    rig.apply({"m": v1})
    rig.settle()
    release = make_release(rig.hub.key, "m", "2.0.0", seed=2, padding_bytes=30_000)
    v2 = rig.hub.publish(release, pin=True)
    manifest = release.signed.to_bytes()
    if journaled == "other":
        other = release.manifest.model_copy(update={"metrics": {"accuracy": 0.5}})
        manifest = sign_manifest(other, rig.hub.key).to_bytes()
    rig.close()
    # Forge the journal as a crash in `crashed_in` would leave it, with half the file on disk.
    store = Store(rig.settings.db_path)
    record = store.model("m")
    pending = Slot("2.0.0", "cpu-fp32", release.sha256, v2.manifest_url, manifest.decode(), v2.manifest_sha256)
    store.save_model(record.with_(state=crashed_in, pending=pending, desired_version="2.0.0"))
    store.close()
    data = release.files[release.sha256]
    cache = ArtifactCache(rig.settings.cache_dir, 4096, 0)
    cache.part_path(release.sha256).write_bytes(data[:10_000])
    rig.hub.ranges.clear()
    rig.open()
    rig.updater.recover()
    assert rig.serving("m") == "1.0.0"  # restored (re-verified) before anything else
    rig.settle()
    assert rig.serving("m") == serves
    after = rig.store.model("m")
    if serves == "2.0.0":
        assert after.state == S.ACTIVE and rig.hub.ranges == ["bytes=10000-"]
    else:
        assert after.state == S.ROLLED_BACK and "sha256 differs from the desired state's" in (after.error or "")
        assert rig.hub.ranges == []  # refused before any byte of the file was fetched


def test_after_a_crash_a_rotten_active_file_is_never_served(rig: Rig) -> None:
    release = make_release(rig.hub.key, "m", "1.0.0", seed=1)
    rig.apply({"m": rig.hub.publish(release)})
    rig.settle()
    rig.close()
    path = rig.cache.path(release.sha256)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    rig.open()
    rig.updater.recover()
    assert rig.serving("m") is None
    assert "restore 1.0.0" in (rig.store.model("m").error or "")
    # The retained desired state comes back: the file is fetched again and verified.
    rig.apply({"m": DesiredModel(version="1.0.0", manifest_url=rig.hub.manifest_url("m", "1.0.0"))})
    rig.settle()
    assert rig.serving("m") == "1.0.0" and rig.store.model("m").state == S.ACTIVE


def test_backoff_is_capped_exponential_with_jitter() -> None:
    from agent.errors import backoff_delay

    delays = [backoff_delay(attempt, 0.5, 8.0) for attempt in range(12) for _ in range(20)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    late = [backoff_delay(10, 0.5, 8.0) for _ in range(50)]
    assert len({round(d, 6) for d in late}) > 1, "jitter spreads a fleet's retries"
    assert max(backoff_delay(0, 0.5, 8.0) for _ in range(50)) <= 1.0
