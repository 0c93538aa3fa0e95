"""Write the JSON Schema of every wire model: ``python -m shared.schema OUTDIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shared.keys import KeyChain
from shared.manifest import SignedManifest
from shared.messages import (
    Command,
    CommandResult,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    Presence,
    Release,
    ReportedState,
    TelemetryBatch,
)

__all__ = ["SCHEMA_MODELS", "write_schemas"]

SCHEMA_MODELS: tuple[type[BaseModel], ...] = (
    DesiredState,
    ReportedState,
    Command,
    CommandResult,
    TelemetryBatch,
    Presence,
    Release,
    EnrollRequest,
    EnrollResponse,
    SignedManifest,
    KeyChain,
)


def write_schemas(outdir: Path) -> list[Path]:
    """Write one ``<Model>.schema.json`` per wire model into `outdir`; return the paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for model in SCHEMA_MODELS:
        path = outdir / f"{model.__name__}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m shared.schema OUTDIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m shared.schema OUTDIR\n")
        return 2
    for path in write_schemas(Path(args[0])):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
