"""Load a text-generation variant folder into a servable model, and smoke-test it.

The folder is the verified files of the variant (graph, external weights, tokenizer,
config), linked from the content-addressed cache under their names. The loop is
`shared.generation` (plain ONNX Runtime, imported here only: an agent serving no
language model does not load it). The smoke test is the manifest's: each sample prompt's
first N greedy tokens must equal the ones the hub recorded from the torch model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent.errors import ModelLoadError, SmokeTestError
from agent.textgen import SequenceLimiter, TextModel, TokenLoop, derive_max_sequences
from shared.manifest import Manifest, Variant

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.runtime import LoadedModel

__all__ = ["free_memory_bytes", "load_text_model", "smoke_test_text"]

logger = logging.getLogger(__name__)


def free_memory_bytes() -> int:
    """Return MemAvailable (what can be had without swapping); a conservative 1 GiB when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def load_text_model(
    manifest: Manifest, variant: Variant, folder: Path, threads: int, settings: AgentSettings
) -> LoadedModel:
    """Load the variant folder with the generation loop; raise ModelLoadError."""
    from agent.chat_template import ChatTemplate, TemplateError
    from agent.runtime import LoadedModel, release_heap, release_mapped_pages
    from shared.generation import GenerationError, load_model, load_tokenizer

    spec = manifest.generation
    if spec is None:
        raise ModelLoadError(f"{manifest.name} {manifest.version}: a text-generation manifest without generation")
    where = f"{manifest.name} {manifest.version} ({variant.target})"
    try:
        loop = load_model(
            folder,
            spec=spec,
            graph=variant.local_path(variant.file),
            providers=list(variant.providers),
            session_options=_session_options(threads),
        )
        tokenizer = load_tokenizer(folder, spec)
    except GenerationError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc
    template = None
    if spec.chat_template:
        try:
            template = ChatTemplate(
                spec.chat_template, _token(tokenizer, spec.bos_token_id), _token(tokenizer, spec.eos_token_ids[0])
            )
        except TemplateError as exc:
            raise ModelLoadError(f"{where}: {exc}") from exc
    release_heap()
    release_mapped_pages(folder)
    kv = loop.kv_bytes_per_token
    serving: TokenLoop = loop
    session: Any = loop.session
    slots = settings.generation_max_sequences or derive_max_sequences(free_memory_bytes(), kv, spec.context_length)
    if settings.generation_backend == "genai":
        serving, session = _genai(loop, folder, variant, spec.eos_token_ids, where)
    elif settings.generation_batching and loop.share_buffer and slots > 1:
        serving = _batched(loop, slots, where)
    text = TextModel(
        name=manifest.name,
        version=manifest.version,
        tokenizer=tokenizer,
        loop=serving,
        context_length=spec.context_length,
        limiter=SequenceLimiter(slots, settings.generation_queue),
        template=template,
        eos_token_ids=tuple(spec.eos_token_ids),
        defaults=spec.defaults.model_dump(),
        timeout_s=settings.generation_timeout_s,
        kv_bytes_per_token=kv,
    )
    logger.info(
        "%s: %d sequences at once (KV %d bytes/token, context %d), %d queued",
        where,
        slots,
        kv,
        spec.context_length,
        settings.generation_queue,
    )
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        target=str(variant.target),
        manifest=manifest,
        variant=variant,
        session=session,
        path=folder / variant.local_path(variant.file),
        providers=tuple(loop.session.get_providers()) if session is not None else ("onnxruntime-genai",),
        text=text,
    )


def _session_options(threads: int) -> Any:
    """Return ORT options for a language model: no CPU memory arena.

    Each request's KV cache grows by one token a step (a new, slightly larger tensor each
    time); ORT's arena keeps every size it ever held, so after a few concurrent requests it
    holds the peak for good. Without it freed caches go back to malloc, and the agent trims
    the heap when no sequence is in flight (measured on SmolLM2-135M int4: -20 MB).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    return options


def _batched(loop: Any, slots: int, where: str) -> TokenLoop:
    """Return the loop decoding `slots` sequences as one batch, or the loop itself where it cannot."""
    from shared.generation import GenerationError
    from shared.generation.batch import BatchedModel

    try:
        return BatchedModel(loop, slots)
    except GenerationError as exc:
        logger.warning("%s: decoding one sequence at a time: %s", where, exc)
        return cast(TokenLoop, loop)


def _genai(loop: Any, folder: Path, variant: Variant, eos: list[int], where: str) -> tuple[TokenLoop, Any]:
    """Return ORT GenAI over the folder, or the own loop (logged) where it cannot serve this model."""
    from agent.genai_backend import GenaiLoop, available

    if not available():
        logger.warning("%s: onnxruntime-genai is not installed (extra `genai`); serving with the own loop", where)
        return loop, loop.session
    if not (folder / "genai_config.json").is_file():
        logger.warning("%s: no genai_config.json in the variant; serving with the own loop", where)
        return loop, loop.session
    try:
        genai = GenaiLoop(folder, loop.kv_bytes_per_token, loop.context_length, eos, variant.providers)
    except Exception as exc:  # og raises RuntimeError for configs it cannot run
        logger.warning("%s: onnxruntime-genai cannot load the model (%s); serving with the own loop", where, exc)
        return loop, loop.session
    logger.info("%s: served by onnxruntime-genai", where)
    return genai, None


def _token(tokenizer: object, token_id: int | None) -> str:
    if token_id is None:
        return ""
    text = tokenizer.id_to_token(token_id)  # type: ignore[attr-defined]
    return str(text) if text is not None else ""


def smoke_test_text(model: LoadedModel) -> None:
    """Generate each sample prompt greedily; the first N tokens must be the recorded ones."""
    from shared.generation import GenerationError, SamplingParams

    text = model.text
    spec = model.manifest.generation
    assert text is not None and spec is not None
    metrics = model.variant.metrics.generation if model.variant.metrics else None
    wanted = spec.parity_tokens
    if metrics is not None and metrics.parity_matched is not None:
        wanted = min(wanted, metrics.parity_matched)  # what the gate accepted for this variant
    where = f"{model.name} {model.version} ({model.target})"
    if not spec.samples:
        raise SmokeTestError(f"{where}: the manifest has no sample prompt to check the model with")
    eos = set(spec.eos_token_ids)
    for sample in spec.samples:
        expected = list(sample.expected_ids)
        cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
        n = min(max(wanted, 1), len(expected))
        params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=frozenset())
        try:
            got = list(text.loop.generate(sample.prompt_ids, params))
        except GenerationError as exc:
            raise SmokeTestError(f"{where}: the sample prompt does not run: {exc}") from exc
        except Exception as exc:  # ORT's own errors on a broken graph
            raise SmokeTestError(f"{where}: the sample prompt does not run: {exc}") from exc
        if got[: min(n, cut)] != expected[: min(n, cut)] or (cut < n and len(got) != cut):
            raise SmokeTestError(
                f"{where}: greedy tokens {got[:n]} for {sample.text[:40]!r} differ from the manifest's {expected[:n]}"
            )
    logger.info("%s: the first %d greedy tokens of %d sample prompts match", where, wanted, len(spec.samples))
