from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from shared.codec import encode
from shared.schema import SCHEMA_MODELS
from tests.support.wire_examples import EXAMPLES


def test_schema_command_writes_a_schema_per_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shared.schema", str(tmp_path)], check=True, capture_output=True, text=True
    )
    written = {Path(line).name for line in out.stdout.split()}
    assert written == {f"{m.__name__}.schema.json" for m in SCHEMA_MODELS}


def test_encoded_messages_validate_against_their_json_schema(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "shared.schema", str(tmp_path)], check=True)
    for message in EXAMPLES:
        schema = json.loads((tmp_path / f"{type(message).__name__}.schema.json").read_text())
        jsonschema.validate(json.loads(encode(message)), schema)
