"""Run ONNX Runtime GenAI's model builder for several targets in one process.

Executed by the builder's own Python (.venv-builder; see builder-requirements.txt), never
imported by the hub: stdlib and onnxruntime_genai only. Importing the builder (torch,
transformers 5) costs more than building a small model, so one process builds every target.

    python lm_builder_driver.py jobs.json results.json

jobs.json: [{"target", "input", "output", "precision", "execution_provider", "cache_dir", "extra_options": {k: v}}]
results.json: [{"target", "ok", "error", "seconds"}], written after each job.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(jobs_path: str, results_path: str) -> int:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    results = []
    for job in jobs:
        started = time.monotonic()
        try:
            pairs = [f"{k}={v}" for k, v in job.get("extra_options", {}).items()]
            options = parse_extra_options(
                None, job["input"], job["output"], job["precision"], job["execution_provider"], job["cache_dir"], pairs
            )
            create_model(
                None,
                job["input"],
                job["output"],
                job["precision"],
                job["execution_provider"],
                job["cache_dir"],
                **options,
            )
            results.append({"target": job["target"], "ok": True, "error": None, "seconds": time.monotonic() - started})
        except Exception as exc:  # one target failing must not stop the others
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
            results.append(
                {"target": job["target"], "ok": False, "error": error, "seconds": time.monotonic() - started}
            )
        with open(results_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
