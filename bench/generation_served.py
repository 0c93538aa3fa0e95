"""Served text generation: decode tokens/s streamed over HTTP by a real agent against the in-process loop.

At concurrency 1 and 4: each request streams `--tokens` new tokens after a `--prompt-tokens`
prompt from `autodl-agent run` (OpenAI completions, SSE), and the same loop
(`shared.generation`) runs the same prompt in this process. Also time to first token, and
the agent's RSS while serving (with a check that no torch is mapped in it).

    .venv/bin/python bench/generation_served.py --folder DIR [--json] [--tokens 128] [--runs 5]

DIR is a variant folder as the hub publishes it (graph, weights, genai_config.json,
tokenizer.json: the model builder's output, e.g. the cpu-int4 folder of SmolLM2-135M-Instruct
that `bench/generation.py` or `autodl-hub build` writes). The agent gets it as a converged
agent has it: a signed manifest naming every file by sha256 in its journal, the files in its
cache. The bench's manifest names an unused token as EOS (like llama-bench's ignore-eos),
so every request decodes exactly `--tokens` tokens. Timings are medians of interleaved runs;
a ratio is the median of the runs' ratios, each of two measurements made back to back.

Targets (issue "Text generation: agent"): served decode tokens/s at concurrency 1 >= 95% of
the in-process loop's; total tokens/s at concurrency 4 above concurrency 1's; agent RSS
serving SmolLM2-135M int4 <= 300 MB (`agent_rss_llm_mb`: the peak sampled while four
streams run), no torch in the process.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.footprint import rss_mb, torch_loaded  # noqa: E402
from bench.machine import cpu_flag_set  # noqa: E402
from tests.support.processes import free_port, stop_process, wait_http_ready  # noqa: E402

NAME = "lm"
TEXT = (
    "def fibonacci(n):\n    '''Return the n-th Fibonacci number.'''\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nclass Edge:\n    '''A device at the edge of the network.'''\n"
) * 20


def cpu_flags() -> list[str]:
    """Return the CPU flags of this machine that matter to ONNX Runtime's kernels."""
    flags = cpu_flag_set()
    return [f for f in ("fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]


def bench_spec(folder: Path, prompt_ids: list[int]) -> Any:
    """Return the folder's GenerationSpec with an unused EOS and a parity sample made by the loop itself."""
    from shared.generation import SamplingParams, load_model, read_genai_config, spec_from_genai_config
    from shared.manifest import SamplePrompt

    template = folder / "chat_template.jinja"
    spec = spec_from_genai_config(
        read_genai_config(folder), chat_template=template.read_text() if template.is_file() else None
    )
    spec = spec.model_copy(update={"eos_token_ids": [spec.vocab_size - 1]})
    expected = list(load_model(folder, spec=spec).generate(prompt_ids, SamplingParams(max_new_tokens=8)))
    sample = SamplePrompt(text="bench", prompt_ids=prompt_ids, expected_ids=expected)
    return spec.model_copy(update={"samples": [sample], "parity_tokens": 8})


def prepare_state(state_dir: Path, folder: Path, spec: Any, target: str) -> None:
    """Write an identity, the folder's files in the cache and a journal with the model active."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.config import AgentSettings, Identity, save_identity
    from agent.store import ModelRecord, Slot, Store
    from shared.manifest import Manifest, TensorSpec, Variant, VariantFile, public_key_b64, sign_manifest
    from shared.messages import UpdateState

    key = Ed25519PrivateKey.generate()
    settings = AgentSettings(state_dir=state_dir)
    save_identity(
        settings,
        Identity(
            device_id="bench-lm",
            device_token="bench-token-0123456789",
            mqtt_host="127.0.0.1",
            mqtt_port=free_port(),  # no broker: the agent serves and retries in the background
            mqtt_username="bench-lm",
            mqtt_password="x",
            signing_public_key=public_key_b64(key),
            hub_url="http://127.0.0.1:9",
        ),
    )
    objects = settings.cache_dir / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (objects / sha).write_bytes(data)
        files.append(VariantFile(path=f"{target}/{path.relative_to(folder).as_posix()}", size=len(data), sha256=sha))
    graph = next(f for f in files if f.path == f"{target}/model.onnx")
    manifest = Manifest(
        name=NAME,
        version="1.0.0",
        task="text-generation",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=[1, "sequence"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, "sequence", spec.vocab_size])],
        generation=spec,
        variants=[
            Variant(
                target=target,
                precision="int4" if "int4" in target else "int8" if "int8" in target else "fp32",
                providers=["CPUExecutionProvider"],
                file=graph.path,
                size=graph.size,
                sha256=graph.sha256,
                files=files,
            )
        ],
    )
    signed = sign_manifest(manifest, key)
    store = Store(settings.db_path)
    slot = Slot("1.0.0", target, graph.sha256, "http://127.0.0.1:9/m", signed.to_bytes().decode())
    store.save_model(ModelRecord(name=NAME, state=UpdateState.ACTIVE, desired_version="1.0.0", active=slot))
    store.close()


def in_process(folder: Path, spec: Any, prompt_ids: list[int], tokens: int, threads: int) -> Any:
    """Return a function timing one in-process generation: (ttft_s, decode tokens/s)."""
    from shared.generation import SamplingParams, load_model

    model = load_model(folder, spec=spec, threads=threads)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        first = end = start
        count = 0
        for _ in model.generate(prompt_ids, SamplingParams(max_new_tokens=tokens)):
            end = time.perf_counter()
            count += 1
            if count == 1:
                first = end
        return first - start, (count - 1) / (end - first)

    return once


def served(url: str, prompt: str, tokens: int) -> dict[str, float]:
    """Stream one completion; return its time to first token, decode tokens/s and tokens.

    Read with the standard library's http.client: the client shares the two cores with the
    agent, and httpx's per-event work (about 0.45 ms of CPU a token here) took 5-8 % off the
    rate it measured, which is the client's cost, not the server's.
    """
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    completion = 0
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                completion = int(event["usage"]["completion_tokens"])
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    finally:
        connection.close()
    return {"ttft_s": first - start, "tps": (completion - 1) / (last - first), "tokens": completion, "end": last}


def concurrent(url: str, prompt: str, tokens: int, n: int, pid: int) -> dict[str, float]:
    """Run `n` streams at once; return total tokens/s over the wall time and the agent's peak RSS meanwhile."""
    results: list[dict[str, float]] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda: results.append(served(url, prompt, tokens))) for _ in range(n)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.05)
    wall = max(r["end"] for r in results) - start
    return {"total_tps": sum(r["tokens"] for r in results) / wall, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--folder", type=Path, required=True, help="a variant folder (model builder output)")
    parser.add_argument("--target", default="cpu-int4")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs; a ratio is the median of theirs")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, in-process and in the agent")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from shared.generation import load_tokenizer

    folder = args.folder.resolve()
    tokenizer = load_tokenizer(folder)
    prompt_ids = list(tokenizer.encode(TEXT, add_special_tokens=False).ids[: args.prompt_tokens])
    prompt = tokenizer.decode(prompt_ids)
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False).ids)  # what the server will see
    spec = bench_spec(folder, prompt_ids)
    local = in_process(folder, spec, prompt_ids, args.tokens, args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    state = work / "agent"
    prepare_state(state, folder, spec, args.target)
    port = free_port()
    env = {
        "AUTODL_AGENT_INTRA_OP_THREADS": str(args.threads),
        "AUTODL_AGENT_GENERATION_MAX_SEQUENCES": "4",
        "AUTODL_AGENT_BACKOFF_MIN_S": "5",
    }
    import os
    import subprocess

    cmd = [sys.executable, "-c", "from agent.cli import main; main()", "run", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "WARNING"],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{url}/v2/health/ready", proc, "the agent", 300)
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/v2/models/{NAME}/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not load the model")
            time.sleep(0.5)
        time.sleep(1.0)
        rss_loaded = rss_mb(proc.pid)
        served(url, prompt, 8)  # warm-up
        local()
        local_ttft, local_tps, served_ttft, served_tps, c4_total, c1_total = [], [], [], [], [], []
        peaks: list[float] = []
        for run in range(args.runs):
            # Each run's pair is measured back to back, every other run served first: the
            # machine's speed drifts between runs more than the two differ.
            for side in ("local", "served") if run % 2 == 0 else ("served", "local"):
                if side == "local":
                    t, r = local()
                    local_ttft.append(t)
                    local_tps.append(r)
                else:
                    one = served(url, prompt, args.tokens)
                    served_ttft.append(one["ttft_s"])
                    served_tps.append(one["tps"])
            c1_total.append(concurrent(url, prompt, args.tokens, 1, proc.pid)["total_tps"])
            c4 = concurrent(url, prompt, args.tokens, 4, proc.pid)
            c4_total.append(c4["total_tps"])
            peaks.append(c4["peak_rss_mb"])
        rss = max(peaks)
        rss_after = rss_mb(proc.pid)
        torch_in_agent = torch_loaded(proc.pid)
    finally:
        stop_process(proc, 20)

    med = statistics.median
    result = {
        "model_folder": str(folder),
        "target": args.target,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.tokens,
        "threads": args.threads,
        "runs": args.runs,
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "inprocess_decode_tps": round(med(local_tps), 1),
        "served_decode_tps_c1": round(med(served_tps), 1),
        "served_over_inprocess_decode_c1": round(med([a / b for a, b in zip(served_tps, local_tps, strict=True)]), 3),
        "total_tps_c1": round(med(c1_total), 1),
        "total_tps_c4": round(med(c4_total), 1),
        "total_tps_c4_over_c1": round(med([a / b for a, b in zip(c4_total, c1_total, strict=True)]), 3),
        "inprocess_ttft_ms": round(med(local_ttft) * 1000, 1),
        "served_ttft_ms_c1": round(med(served_ttft) * 1000, 1),
        "agent_rss_llm_mb": round(rss, 1),
        "agent_rss_loaded_mb": round(rss_loaded, 1),
        "agent_rss_after_mb": round(rss_after, 1),
        "torch_in_agent": torch_in_agent,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU flags: {' '.join(result['cpu_flags'])}  threads: {args.threads}  runs: {args.runs}")
    print(f"{len(prompt_ids)}-token prompt, {args.tokens} new tokens, {folder}")
    print(f"{'':32}{'in-process':>12}{'served':>12}")
    print(f"{'decode tokens/s (c=1)':32}{result['inprocess_decode_tps']:>12}{result['served_decode_tps_c1']:>12}")
    print(f"{'time to first token ms (c=1)':32}{result['inprocess_ttft_ms']:>12}{result['served_ttft_ms_c1']:>12}")
    print(f"{'total tokens/s c=1 / c=4':32}{'':>12}{result['total_tps_c1']:>6}/{result['total_tps_c4']}")
    print(f"served/in-process decode c=1: {result['served_over_inprocess_decode_c1']}")
    print(f"total tokens/s c=4 over c=1: {result['total_tps_c4_over_c1']}")
    print(
        f"agent RSS: peak serving 4 streams {result['agent_rss_llm_mb']} MB, after loading"
        f" {result['agent_rss_loaded_mb']} MB, idle after serving {result['agent_rss_after_mb']} MB"
        f" (torch mapped: {torch_in_agent})"
    )


if __name__ == "__main__":
    main()
