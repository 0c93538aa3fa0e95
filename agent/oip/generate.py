"""Write agent/oip/descriptor.py from inference.proto (needs grpcio-tools: `make grpc-stubs`).

The agent loads the compiled descriptor into a pool of its own instead of importing
protoc's generated `_pb2` module: no protobuf gencode/runtime version lock, and no clash
with a client library (tritonclient) that registers the same `inference.*` names in the
default pool of the same process.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Compile the proto and write the module."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inference.desc"
        code = protoc.main(["protoc", f"-I{HERE}", f"--descriptor_set_out={out}", str(HERE / "inference.proto")])
        if code != 0:
            sys.exit(code)
        encoded = base64.b64encode(out.read_bytes()).decode()
    lines = "\n".join(f'    "{chunk}"' for chunk in textwrap.wrap(encoded, 100))
    (HERE / "descriptor.py").write_text(
        '"""Compiled inference.proto (a FileDescriptorSet), written by agent/oip/generate.py: do not edit."""\n\n'
        "import base64\n\n"
        f"FILE_DESCRIPTOR_SET = base64.b64decode(\n{lines}\n)\n"
    )


if __name__ == "__main__":
    main()
