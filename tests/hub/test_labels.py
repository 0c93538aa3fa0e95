"""Who may set a device's labels, against a real hub process: the token decides, the operator wins."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.hub import HubProcess

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with HubProcess(tmp_path_factory.mktemp("labels") / "hub", mqtt=False) as process:
        yield process


def test_the_hubs_state_is_its_owners_only(hub: HubProcess) -> None:
    # `autodl-hub init` made the data dir and the database; `serve` tightened them at start.
    assert hub.data_dir.stat().st_mode & 0o777 == 0o700
    for path in hub.data_dir.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def _token(hub: HubProcess, **body: Any) -> str:
    with hub.api() as client:
        response = client.post("/enrollment-tokens", json={"max_uses": 5, **body})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def _enroll(hub: HubProcess, token: str, labels: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{hub.url}/enroll", json={"token": token, "labels": labels}, timeout=30)


def test_a_device_cannot_put_itself_in_a_ring_unless_its_token_allows_it(hub: HubProcess) -> None:
    plain = _token(hub)
    refused = _enroll(hub, plain, {"ring": "canary", "site": "lab"})
    assert refused.status_code == 403 and "ring" in refused.json()["detail"]
    # The refusal did not spend the token, and keys nobody protects are the device's to set.
    with hub.api() as client:
        uses = {t["id"]: t["uses"] for t in client.get("/enrollment-tokens").json()}
    assert sorted(uses.values())[-1] == 0
    assert _enroll(hub, plain, {"site": "lab"}).json()["labels"] == {"site": "lab"}

    allowing = _token(hub, device_label_keys=["ring"])
    assert _enroll(hub, allowing, {"ring": "canary"}).json()["labels"] == {"ring": "canary"}
    # A token that names its keys allows those only.
    assert _enroll(hub, allowing, {"site": "lab"}).status_code == 403

    # The operator's labels on the token win over what the device says.
    fixed = _token(hub, labels={"ring": "stable"})
    assert _enroll(hub, fixed, {"ring": "canary"}).json()["labels"] == {"ring": "stable"}


def test_an_over_long_or_malformed_label_is_refused_at_enrollment(hub: HubProcess) -> None:
    token = _token(hub)
    for labels in ({"site": "x" * 129}, {"s" * 64: "x"}, {"bad key": "x"}, {f"k{i}": "v" for i in range(33)}):
        response = _enroll(hub, token, labels)
        assert response.status_code == 422, response.text
        assert "xxxx" not in response.text
