"""shared.routes builds the hub paths agents call; the hub serves exactly those templates."""

from __future__ import annotations

from pathlib import Path

from hub.config import HubSettings
from hub.main import create_app
from shared import routes


def test_paths_and_urls() -> None:
    assert routes.manifest("digits", "1.2.0") == "/models/digits/versions/1.2.0/manifest"
    assert routes.artifact("ab" * 32) == f"/artifacts/{'ab' * 32}"
    assert routes.url("http://hub:8080/", routes.ENROLL) == "http://hub:8080/enroll"
    assert (
        routes.url("http://hub:8080", routes.manifest("m", "1.0.0"))
        == "http://hub:8080/models/m/versions/1.0.0/manifest"
    )


def test_the_hub_serves_every_route_an_agent_calls(tmp_path: Path) -> None:
    app = create_app(HubSettings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'hub.db'}"))
    served = {(path, method) for path, ops in app.openapi()["paths"].items() for method in ops}
    app.state.engine.dispose()
    wanted = {
        (routes.ENROLL, "post"),
        (routes.MANIFEST_ROUTE, "get"),
        (routes.ARTIFACT_ROUTE, "get"),
        (routes.ARTIFACT_ROUTE, "head"),
    }
    assert wanted <= served
