"""Signing-key rotation end to end: real mosquitto, real `autodl-hub serve`, real `autodl-agent run`.

The key is rotated while one agent is offline; back online, that agent follows the chain to
the new key and converges to a version it signed. A manifest signed by a key outside the
chain is refused with its reason in the reported state, counted, and nothing changes. Old
manifests verify until the operator retires the old key; retiring it re-signs what the fleet
runs (so nothing stops serving, across a restart too), and from then on the old key's
signatures are refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.security import load_or_create_signing_key
from shared import topics
from shared.codec import encode
from shared.keys import public_key_id
from shared.manifest import SignedManifest, generate_signing_key, public_key_b64
from shared.messages import DesiredModel, DesiredState
from shared.topics import DeviceChannel
from tests.support.agent import AgentProcess
from tests.support.broker import HUB_PASSWORD, HUB_USER
from tests.support.fleet import Fleet
from tests.support.hubstub import HubStub
from tests.support.models import make_release
from tests.support.mqtt import Probe
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "clf"


def _signer(fleet: Fleet, name: str, version: str) -> str:
    """Return the key id a version's manifest, as the hub serves it, is signed by."""
    with fleet.hub.api() as client:
        raw = client.get(f"/models/{name}/versions/{version}/manifest").content
    return SignedManifest.from_bytes(raw).key_id


def _cli(fleet: Fleet, *args: str) -> str:
    return fleet.hub.run_cli("signing-key", *args, "--hub", fleet.hub.url, "--api-key", fleet.hub.admin_key).stdout


def _refused(fleet: Fleet, agent: AgentProcess) -> dict[str, float]:
    metrics = httpx.get(f"{agent.url}/metrics", timeout=5).text
    prefix = 'autodl_agent_manifests_refused_total{reason="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(prefix)
    }


def _rolled_back(fleet: Fleet, agent: AgentProcess, version: str) -> dict[str, Any]:
    """Wait until the hub has the agent's report of refusing `version`; return it."""

    def refused() -> dict[str, Any] | None:
        report = fleet.hub.reported(agent.device_id, MODEL)
        return report if report.get("desired") == version and report.get("state") == "rolled_back" else None

    return wait_for(f"{agent.device_id} to refuse {version}", refused, 90)


def test_rotation_offline_agent_unchained_key_and_retirement(tmp_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()  # the hub re-signs every release with its own key
    versions = {"1.0.0": {"seed": 1}, "2.0.0": {"seed": 2}, "3.0.0": {"seed": 3}}
    with Fleet(tmp_path, model=MODEL, versions={"1.0.0": versions["1.0.0"]}, agents=2, initial="1.0.0") as fleet:
        fleet.versions.update(versions)  # what assert_serves compares with
        online, offline = fleet.agents
        first = public_key_id(fleet.identity(offline)["signing_public_key"])
        fleet.hub.upload(make_release(signer, MODEL, "2.0.0", seed=2))
        assert _signer(fleet, MODEL, "2.0.0") == first

        # Rotate while one agent is down.
        offline.stop()
        out = _cli(fleet, "rotate")
        second = out.split()[2]
        assert second != first and f"endorsed by {first}" in out
        fleet.hub.upload(make_release(signer, MODEL, "3.0.0", seed=3))
        assert _signer(fleet, MODEL, "3.0.0") == second
        listed = _cli(fleet, "list")
        assert f"{first}\tvalid\t2 versions" in listed and f"{second}\tcurrent\t1 versions" in listed

        # The agent that stayed up follows the chain to the new key; the old key's manifests still verify.
        fleet.converge("3.0.0", [online])
        fleet.converge("2.0.0", [online])
        assert fleet.status(online)["signing_keys"]["trusted"] == sorted([first, second])

        # Back online, the other agent gets the desired state kept for it and follows the chain too.
        fleet.deploy(offline, "3.0.0")
        offline.start().wait_live()
        wait_for("the offline agent to serve 3.0.0", lambda: offline.serving(MODEL) == "3.0.0", 90)
        fleet.assert_serves(offline, "3.0.0")
        assert fleet.status(offline)["signing_keys"]["trusted"] == sorted([first, second])

        # A key outside the chain (a key file replaced by hand): its manifests are refused.
        key_file = fleet.hub.settings.signing_key
        kept = key_file.read_bytes()
        stray = key_file.with_name("stray.pem")
        stray.write_bytes(generate_signing_key())
        os.replace(stray, key_file)
        fleet.hub.upload(make_release(signer, MODEL, "4.0.0", seed=4))
        unchained = _signer(fleet, MODEL, "4.0.0")
        assert unchained not in (first, second)
        fleet.deploy(offline, "4.0.0")
        report = _rolled_back(fleet, offline, "4.0.0")
        assert f"signed by key {unchained}, which no trusted key endorses" in report["error"]
        assert report["active"] == "3.0.0" and offline.serving(MODEL) == "3.0.0"
        assert _refused(fleet, offline).get("unknown_key") == 1
        assert unchained not in fleet.status(offline)["signing_keys"]["trusted"]
        assert "refused unknown_key 1" in offline.run_cli("status", "--state-dir", str(offline.state_dir)).stdout
        key_file.write_bytes(kept)
        assert public_key_id(public_key_b64(load_or_create_signing_key(key_file))) == second

        # Before retirement the old key's manifest is what `online` journaled for 2.0.0.
        with fleet.hub.api() as client:
            old_bytes = client.get(f"/models/{MODEL}/versions/1.0.0/manifest").content
        assert SignedManifest.from_bytes(old_bytes).key_id == first

        # Retire the first key: what it signed is re-signed, the device serving 2.0.0 keeps serving it.
        out = _cli(fleet, "retire", first)
        assert "2 versions re-signed, 1 devices' desired states updated" in out
        assert _signer(fleet, MODEL, "1.0.0") == second and _signer(fleet, MODEL, "2.0.0") == second
        wait_for("the retirement to reach the agent", lambda: fleet.status(online)["signing_keys"]["retired"], 60)
        assert fleet.status(online)["signing_keys"]["retired"] == [first]
        revision = fleet.hub.device(online.device_id)["desired"]["revision"]
        wait_for("the re-signed 2.0.0 taken", lambda: fleet.status(online)["applied_revision"] == revision, 60)
        online.stop()
        online.start().wait_live()  # the journal holds the re-signed manifest: 2.0.0 is restored
        wait_for("2.0.0 restored after the retirement", lambda: online.serving(MODEL) == "2.0.0", 90)
        fleet.assert_serves(online, "2.0.0")

        # A manifest the retired key signed, delivered by someone else, is refused.
        stub = HubStub().start()
        probe = Probe(fleet.broker.port, HUB_USER, HUB_PASSWORD, client_id="not-the-hub")
        try:
            stub.manifests[(MODEL, "1.0.0")] = old_bytes
            stub.device_token = fleet.identity(online)["device_token"]
            forged = DesiredState(
                device_id=online.device_id,
                revision=1000,
                models={
                    MODEL: DesiredModel(
                        version="1.0.0",
                        manifest_url=stub.manifest_url(MODEL, "1.0.0"),
                        manifest_sha256=hashlib.sha256(old_bytes).hexdigest(),
                    )
                },
            )
            probe.connect()
            probe.publish(topics.device_topic(online.device_id, DeviceChannel.DESIRED), encode(forged), retain=True)
            wait_for("the forged 1.0.0 refused", lambda: _refused(fleet, online).get("retired_key") == 1, 90)
        finally:
            probe.close()
            stub.stop()
        # The device then reports revision 1000, which the hub never made: the hub renumbers its own
        # desired state past it (a device ignores older revisions), and the device takes it back.
        renumbered = wait_for(
            "the hub to renumber its desired state",
            lambda: (r := fleet.hub.device(online.device_id)["desired"]["revision"]) > 1000 and r,
            60,
        )
        wait_for("the renumbered state applied", lambda: fleet.status(online)["applied_revision"] == renumbered, 60)
        journal = fleet.command("diagnostics", agent=online)["result"]["journal"]
        assert any(f"signed by key {first}, which the hub retired" in (e["detail"] or "") for e in journal)
        assert online.serving(MODEL) == "2.0.0"
        assert _refused(fleet, online).get("retired_key") == 1
        fleet.assert_alive()
        events = [e["action"] for e in fleet.hub.call("GET", "/audit", params={"action": "signing_key.retire"})]
        assert events == ["signing_key.retire"]
