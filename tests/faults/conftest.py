"""One real fleet for the fault tests: test-owned mosquitto, a hub process, two agents on 1.0.0."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faults import MODEL, VERSIONS
from tests.support.fleet import HUB_JUDGES_LATENCY, Fleet


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # Twenty kills in a row look like a crash loop; keep the supervisor's restart delay short.
    root = tmp_path_factory.mktemp("faults")
    options = {"backoff_max_s": 2.0}
    with Fleet(
        root, model=MODEL, versions=VERSIONS, initial="1.0.0", agent_env=HUB_JUDGES_LATENCY, broker_options=options
    ) as fleet:
        yield fleet
