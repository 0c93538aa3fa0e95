#!/usr/bin/env python3
"""Print the agent image's requirements: the base dependencies plus the extras named (default: ``agent``).

The ONNX Runtime requirement is swapped for the build's choice (``--ort onnxruntime-gpu``
for CUDA; ``--ort ''`` when the base image already has one, such as JetPack's
onnxruntime-gpu on an L4T base). Dockerfile.agent installs exactly this list, and
tests/deploy checks that it resolves without torch.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ORT_NAMES = {"onnxruntime", "onnxruntime-gpu"}
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """Return the normalized distribution name of a requirement string."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def agent_requirements(pyproject: Path, ort_package: str, extras: Sequence[str] = ("agent",)) -> list[str]:
    """Return the requirement lines for the agent image."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += [r for r in project["optional-dependencies"][extra] if r not in wanted]
    lines = [r for r in wanted if requirement_name(r) not in ORT_NAMES]
    ort = ort_package.strip()
    if ort:
        declared = next((r for r in wanted if requirement_name(r) in ORT_NAMES), None)
        bare = _NAME.fullmatch(ort)
        if bare is not None and declared is not None:
            # A bare name keeps the version range the project declares for ONNX Runtime.
            name = _NAME.match(declared)
            ort += declared[name.end() :] if name is not None else ""
        lines.insert(0, ort)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print one requirement per line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--ort", default="onnxruntime", help="the ONNX Runtime requirement, or '' for none")
    parser.add_argument("--extra", action="append", help="an extra to include (repeatable; default: agent)")
    args = parser.parse_args(argv)
    lines = agent_requirements(args.pyproject, args.ort, args.extra or ["agent"])
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
