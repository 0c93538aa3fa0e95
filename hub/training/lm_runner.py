"""Run a text-generation task: corpus -> tokenizer -> candidates scored -> the best trained -> HF folder.

Every candidate gets the same budget (`training.select_steps` optimizer steps of the same
batch and block; a checkpoint is evaluated, then fine-tuned for that budget when
`training.fine_tune`), and is scored by validation perplexity. Candidates that do not share
a tokenizer are compared by bits per byte of validation text instead, since a per-token
perplexity depends on how long the tokens are. With a `search` section, Optuna then tunes
learning rate, warm-up and width of the winner. The winner trains `training.max_steps`
steps and is saved as a Hugging Face folder (config, safetensors, tokenizer, chat
template, generation config) that the build exports.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hub.training.checkpoints import CheckpointCandidate, inspect_checkpoint, load_checkpoint
from hub.training.corpus import Corpus, CorpusReport, load_corpus, resolve_corpus
from hub.training.errors import SpecError
from hub.training.lm_tokenizer import encode_documents, render, stop_token_ids, train_tokenizer
from hub.training.lm_trainer import Evaluation, LMFitConfig, evaluate, fit_lm, validation_blocks
from hub.training.lm_zoo import FamilyCandidate, build_config, build_family_model, parse_family
from hub.training.progress import Progress
from hub.training.search import SearchResult, run_lm_search
from hub.training.spec import GenerationSpec, TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CandidateScore", "LMPlan", "TrainedLM", "check_text_generation", "train_text_generation"]

logger = logging.getLogger(__name__)

Candidate = FamilyCandidate | CheckpointCandidate
_SAMPLE_PROMPTS = 4
_PROMPT_CHARS = 80


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's result under the shared budget."""

    name: str
    kind: str  # family, hf, gguf, baichuan
    steps: int
    parameters: int
    val_perplexity: float
    val_bits_per_byte: float
    train_loss: float
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the score as JSON-able data."""
        return {
            "name": self.name,
            "kind": self.kind,
            "steps": self.steps,
            "parameters": self.parameters,
            "val_perplexity": self.val_perplexity,
            "val_bits_per_byte": self.val_bits_per_byte,
            "train_loss": None if math.isnan(self.train_loss) else self.train_loss,
            "seconds": round(self.seconds, 3),
            "params": self.params,
        }


@dataclass(frozen=True)
class LMPlan:
    """What a text-generation task would do (``--dry-run``)."""

    spec: TaskSpec
    report: CorpusReport
    data_hash: str
    candidates: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-able data (the keys the CLI prints for every task)."""
        return {
            "task": self.spec.task,
            "model": self.spec.publish.model,
            "candidates": self.candidates,
            "trials": self.spec.search.trials if self.spec.search_requested else 0,
            "cv_folds": 1,
            "metric": "perplexity",
            "train_rows": self.report.train_documents,
            "test_rows": self.report.validation_documents,
            "labels": None,
            "device": "cpu",
            "data_hash": self.data_hash,
            "data_report": self.report.to_dict(),
            "targets": [str(t) for t in self.spec.build.targets],
        }


@dataclass(frozen=True)
class TrainedLM:
    """The trained text-generation model and what the build needs beside it."""

    spec: TaskSpec
    model_dir: Path  # Hugging Face folder
    model: PreTrainedModel  # CPU, eval mode
    tokenizer: PreTrainedTokenizerBase
    validation_ids: np.ndarray  # [n, block + 1] int64 held-out blocks
    sample_prompts: list[str]
    candidates: list[CandidateScore]
    chosen: str
    val_perplexity: float
    baseline_perplexity: float  # a unigram model of the training tokens
    generation: GenerationSpec
    stop_token_ids: list[int]
    chat_template: str | None
    report: CorpusReport
    search: SearchResult | None
    metrics: dict[str, float]
    lineage: dict[str, Any]


@dataclass
class _Data:
    """A corpus encoded by one tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    train_ids: np.ndarray
    val_blocks: np.ndarray
    val_bytes: int


def _candidates(spec: TaskSpec, base_dir: Path) -> list[Candidate]:
    out: list[Candidate] = []
    for index, name in enumerate(spec.model.candidates):
        family = parse_family(name, spec.model.size)
        checkpoint = None if family is not None else inspect_checkpoint(name, base_dir)
        chosen = family or checkpoint
        if chosen is None:
            raise SpecError(f"model.candidates[{index}]: unknown candidate {name!r}")
        out.append(chosen)
    return out if spec.model.auto_select else out[:1]


def _corpus(spec: TaskSpec, base_dir: Path) -> Corpus:
    path, skip = resolve_corpus(spec.data.path, base_dir)
    return load_corpus(
        path,
        validation_split=spec.data.validation_split,
        seed=spec.training.seed,
        extensions=tuple(spec.data.extensions) if spec.data.extensions else None,
        max_bytes=spec.data.max_bytes,
        max_line_length=spec.data.max_line_length,
        clean=spec.data.clean,
        skip_dirs=skip,
    )


def check_text_generation(spec: TaskSpec, base_dir: Path) -> LMPlan:
    """Load and check the data and candidates; train nothing."""
    corpus = _corpus(spec, base_dir)
    candidates = _candidates(spec, base_dir)
    return LMPlan(spec, corpus.report, corpus.data_hash, [c.label for c in candidates])


def _encode(spec: TaskSpec, corpus: Corpus, tokenizer: PreTrainedTokenizerBase) -> _Data:
    train_ids = encode_documents(corpus.train, tokenizer)
    val_ids = encode_documents(corpus.validation, tokenizer)
    blocks = validation_blocks(val_ids, spec.model.max_length, max_blocks=64)
    # Bits per byte over exactly the scored tokens: their text's UTF-8 length.
    scored = blocks[:, 1:].reshape(-1).tolist()
    val_bytes = len(tokenizer.decode(scored, skip_special_tokens=False).encode("utf-8"))
    return _Data(tokenizer, train_ids, blocks, max(1, val_bytes))


def train_text_generation(
    spec: TaskSpec,
    base_dir: Path,
    out_dir: Path,
    *,
    storage: str | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> TrainedLM:
    """Run the task; write the winner as a Hugging Face folder under `out_dir` / "model"."""
    if spec.resource.threads is not None:
        torch.set_num_threads(spec.resource.threads)
    corpus = _corpus(spec, base_dir)
    candidates = _candidates(spec, base_dir)
    say = progress.message if progress is not None else (lambda text: logger.info("%s", text))
    report = corpus.report
    say(
        f"data: {report.documents} documents ({report.train_documents} train / {report.validation_documents} "
        f"validation), {report.bytes} bytes, {len(report.issues)} findings"
    )
    data: dict[str, _Data] = {}
    loaded: dict[str, Any] = {}
    if any(isinstance(c, FamilyCandidate) for c in candidates):
        started = time.perf_counter()
        tokenizer = train_tokenizer(corpus.train, vocab_size=spec.model.vocab_size, chat=corpus.is_chat)
        data["trained"] = _encode(spec, corpus, tokenizer)
        say(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - started:.1f} s")
    for candidate in candidates:
        if isinstance(candidate, CheckpointCandidate):
            checkpoint = load_checkpoint(candidate)
            if corpus.is_chat and not checkpoint.tokenizer.chat_template:
                raise SpecError(f"model.candidates: {candidate.name} has no chat template, but the data is chat")
            loaded[candidate.name] = checkpoint
            data[candidate.name] = _encode(spec, corpus, checkpoint.tokenizer)
    first = data["trained"] if "trained" in data else data[candidates[0].name]
    report.tokens = {"train": int(len(first.train_ids)), "validation": int(first.val_blocks.size)}
    baseline = _unigram_perplexity(first)
    budget = spec.training.select_steps if spec.training.select_steps is not None else spec.training.max_steps // 4
    shared_tokenizer = len({id(_data_for(c, data).tokenizer) for c in candidates}) == 1
    params: dict[str, Any] = {"lr": spec.training.lr, "warmup": spec.training.warmup, "width": 1.0}

    def run(candidate: Candidate, steps: int, trial: dict[str, Any], label: str) -> tuple[Any, CandidateScore]:
        d = _data_for(candidate, data)
        model = _model(spec, candidate, d.tokenizer, loaded, float(trial["width"]))
        fit = LMFitConfig(
            steps=steps,
            batch_size=spec.training.batch_size,
            block=spec.model.max_length,
            lr=float(trial["lr"]),
            warmup=float(trial["warmup"]),
            weight_decay=spec.training.weight_decay,
            seed=spec.training.seed,
        )
        if steps:
            result = fit_lm(model, d.train_ids, d.val_blocks, fit, cancel=cancel, progress=progress, label=label)
            evaluation, train_loss, seconds = result.validation, result.train_loss, result.seconds
        else:
            started = time.perf_counter()
            evaluation, train_loss = evaluate(model, d.val_blocks), float("nan")
            seconds = time.perf_counter() - started
        return model, _score(candidate, steps, model, evaluation, d.val_bytes, train_loss, seconds, trial)

    scores: list[CandidateScore] = []
    if len(candidates) > 1:
        for candidate in candidates:
            steps = budget if isinstance(candidate, FamilyCandidate) or spec.training.fine_tune else 0
            _, score = run(candidate, steps, params, f"select {candidate.label}")
            scores.append(score)
            say(
                f"candidate {candidate.label}: validation perplexity {score.val_perplexity:.2f}, "
                f"{score.val_bits_per_byte:.3f} bits/byte after {steps} steps ({score.seconds:.1f} s)"
            )
        key = (lambda s: s.val_perplexity) if shared_tokenizer else (lambda s: s.val_bits_per_byte)
        best_name = min(scores, key=key).name
        best = next(c for c in candidates if c.label == best_name)
    else:
        best = candidates[0]
    search: SearchResult | None = None
    if spec.search_requested and budget > 0:

        def objective(trial: dict[str, Any]) -> float:
            _, score = run(best, budget, {**params, **trial}, f"search {best.label}")
            return score.val_perplexity

        search = run_lm_search(
            spec,
            objective,
            tune_width=isinstance(best, FamilyCandidate),
            storage=storage,
            study_name=spec.search.study_name or f"{spec.publish.model}-{corpus.data_hash[:12]}-{best.label}",
            cancel=cancel,
            progress=progress,
        )
        params.update(search.best.params)
        say(f"search: best {search.best.params} perplexity {search.best.value:.2f} over {len(search.trials)} trials")
    final_steps = spec.training.max_steps if isinstance(best, FamilyCandidate) or spec.training.fine_tune else 0
    model, final = run(best, final_steps, params, f"final {best.label}")
    if len(candidates) == 1:
        scores.append(final)
    model = model.cpu().eval()
    d = _data_for(best, data)
    say(f"final {best.label}: validation perplexity {final.val_perplexity:.2f} (unigram baseline {baseline:.2f})")
    model_dir = out_dir / "model"
    generation = spec.generation_defaults
    stops = stop_token_ids(d.tokenizer)
    _save(model, d.tokenizer, model_dir, generation, stops)
    prompts = generation.sample_prompts or _sample_prompts(corpus, d.tokenizer)
    lineage = {
        "dataset_hash": corpus.data_hash,
        "data_path": spec.data.path,
        "data_report": report.to_dict(),
        "candidate_runs": [s.to_dict() for s in scores],
        "selected_by": "val_perplexity" if shared_tokenizer else "val_bits_per_byte",
        "candidate": best.label,
        "params": params,
        "final": final.to_dict(),
        "search": search.to_dict() if search is not None else None,
        "training_config": spec.model_dump(mode="json"),
    }
    (out_dir / "training.json").write_text(json.dumps(lineage, indent=2, default=str))
    return TrainedLM(
        spec=spec,
        model_dir=model_dir,
        model=model,
        tokenizer=d.tokenizer,
        validation_ids=d.val_blocks,
        sample_prompts=prompts,
        candidates=scores,
        chosen=best.label,
        val_perplexity=final.val_perplexity,
        baseline_perplexity=baseline,
        generation=generation,
        stop_token_ids=stops,
        chat_template=d.tokenizer.chat_template if isinstance(d.tokenizer.chat_template, str) else None,
        report=report,
        search=search,
        metrics={
            "val_perplexity": final.val_perplexity,
            "val_bits_per_byte": final.val_bits_per_byte,
            "baseline_perplexity": baseline,
        },
        lineage=lineage,
    )


def _data_for(candidate: Candidate, data: dict[str, _Data]) -> _Data:
    return data["trained"] if isinstance(candidate, FamilyCandidate) else data[candidate.name]


def _model(
    spec: TaskSpec, candidate: Candidate, tokenizer: PreTrainedTokenizerBase, loaded: dict[str, Any], width: float
) -> PreTrainedModel:
    if isinstance(candidate, CheckpointCandidate):
        # Every run starts from the checkpoint as loaded, not from an earlier run's weights.
        model: PreTrainedModel = copy.deepcopy(loaded[candidate.name].model)
        return model
    config = build_config(
        candidate,
        vocab_size=len(tokenizer),
        context_length=spec.generation_defaults.context_length,
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        width=width,
    )
    return build_family_model(config, seed=spec.training.seed)


def _score(
    candidate: Candidate,
    steps: int,
    model: PreTrainedModel,
    evaluation: Evaluation,
    val_bytes: int,
    train_loss: float,
    seconds: float,
    params: dict[str, Any],
) -> CandidateScore:
    kind = "family" if isinstance(candidate, FamilyCandidate) else candidate.kind
    return CandidateScore(
        name=candidate.label,
        kind=kind,
        steps=steps,
        parameters=sum(p.numel() for p in model.parameters()),
        val_perplexity=evaluation.perplexity,
        val_bits_per_byte=evaluation.nll / math.log(2) / val_bytes,
        train_loss=train_loss,
        seconds=seconds,
        params=dict(params),
    )


def _unigram_perplexity(data: _Data) -> float:
    """Return the perplexity of token frequencies (add-one) on the validation blocks: the floor to beat."""
    vocab = len(data.tokenizer)
    counts = np.bincount(data.train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = data.val_blocks[:, 1:].reshape(-1)
    return float(np.exp(-logp[targets].mean()))


def _save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    generation: GenerationSpec,
    stops: list[int],
) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=generation.max_new_tokens,
        do_sample=generation.temperature > 0,
        temperature=generation.temperature if generation.temperature > 0 else None,
        top_p=generation.top_p if generation.temperature > 0 else None,
        top_k=generation.top_k if generation.temperature > 0 else None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else (stops[0] if stops else None),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _sample_prompts(corpus: Corpus, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Return a few prompts from validation documents: a chat up to its answer, a prompt, or a text's start."""
    prompts: list[str] = []
    for doc in corpus.validation:
        if len(prompts) == _SAMPLE_PROMPTS:
            break
        if doc.kind == "chat":
            turns = list(doc.messages)
            last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
            messages = [{"role": r, "content": c} for r, c in turns[:last]]
            if not messages:
                continue
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(str(text))
        elif doc.kind == "completion":
            prompts.append(doc.prompt)
        else:
            text = render(doc, tokenizer).lstrip()
            cut = text[:_PROMPT_CHARS]
            # End at a line break when there is one, so the continuation starts a line.
            prompts.append(cut[: cut.rfind("\n") + 1] if "\n" in cut[20:] else cut)
    return [p for p in prompts if p.strip()] or ["\n"]
