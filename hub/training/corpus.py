"""Text-generation data: a folder of text files or JSONL, checked, cleaned and split.

A folder (or one file) of ``.txt``/``.md``/``.py``/... files gives one document per file.
JSONL gives one document per line: ``{"text": ...}``, ``{"prompt": ..., "completion": ...}``
or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat; needs an assistant turn).
The report counts documents and bytes (tokens once a tokenizer exists), and finds binary
files, undecodable bytes, over-long lines, empty and duplicate documents, and text shared
by the training and validation split; what it can clean it cleans, with the counts.
Input that cannot train anything (an empty or binary corpus, a bad JSONL line, a chat
without an assistant turn) is a DataError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hub.training.errors import DataError

__all__ = ["BUILTIN_CORPORA", "Corpus", "CorpusReport", "Document", "load_corpus", "resolve_corpus"]

DocKind = Literal["text", "completion", "chat"]
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json")
ROLES = ("system", "user", "assistant")
# The Python standard library's own source (PSF licence), on every machine that runs the hub.
BUILTIN_CORPORA = ("builtin:python-stdlib",)
# Folders of the standard library that are tests, caches or third-party packages.
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Under this many documents, long ones are cut at line boundaries so both splits get some.
_MIN_DOCUMENTS = 10
_CHUNK_CHARS = 4000
# Validation lines at least this long that also occur in training count as overlap.
_OVERLAP_LINE_CHARS = 40


@dataclass(frozen=True)
class Document:
    """One training document: plain text, a prompt and completion, or a chat."""

    source: str  # "file" or "file:line"
    kind: DocKind
    text: str = ""  # text; for a completion, prompt + completion
    prompt: str = ""  # completion: the prompt part (a sample prompt for the manifest)
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content)

    def key(self) -> str:
        """Return the content hash used to find duplicates."""
        body = self.text if self.kind != "chat" else json.dumps(self.messages)
        return hashlib.sha256(body.strip().encode()).hexdigest()


@dataclass
class CorpusReport:
    """What loading found and did; `tokens` is filled in once the tokenizer exists."""

    path: str
    files: int = 0
    documents_in: int = 0
    documents: int = 0
    train_documents: int = 0
    validation_documents: int = 0
    bytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    issues: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)

    def issue(self, check: str, count: int, detail: str, action: str) -> None:
        """Record a finding (only when there is something to report)."""
        if count:
            self.issues.append({"check": check, "column": None, "count": count, "detail": detail, "action": action})

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return {
            "path": self.path,
            "files": self.files,
            "documents_in": self.documents_in,
            "documents": self.documents,
            "train_documents": self.train_documents,
            "validation_documents": self.validation_documents,
            "bytes": self.bytes,
            "kinds": dict(self.kinds),
            "tokens": dict(self.tokens),
            "issues": list(self.issues),
        }


@dataclass(frozen=True)
class Corpus:
    """The cleaned documents, split, with the report and a content hash."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    report: CorpusReport
    data_hash: str

    @property
    def is_chat(self) -> bool:
        """Return True when the data holds chat examples (the model gets a chat template)."""
        return any(d.kind == "chat" for d in self.train + self.validation)


def resolve_corpus(path: str, base_dir: Path) -> tuple[Path, frozenset[str]]:
    """Return the folder or file `path` names (a built-in corpus or a path) and folder names to skip."""
    if path == "builtin:python-stdlib":
        import sysconfig

        return Path(sysconfig.get_paths()["stdlib"]), _STDLIB_SKIP
    if path.startswith("builtin:"):
        raise DataError(f"data.path: unknown built-in corpus {path!r}; choose from {', '.join(BUILTIN_CORPORA)}")
    found = Path(path).expanduser()
    return (found if found.is_absolute() else base_dir / found), frozenset()


def load_corpus(
    path: Path,
    *,
    validation_split: float,
    seed: int,
    extensions: tuple[str, ...] | None = None,
    max_bytes: int | None = None,
    max_line_length: int = 1000,
    clean: bool = True,
    skip_dirs: frozenset[str] = frozenset(),
) -> Corpus:
    """Read, check, clean and split the documents at `path`; raise DataError on unusable input."""
    report = CorpusReport(path=str(path))
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        docs = _read_jsonl(path, report)
    else:
        docs = _read_files(path, report, extensions or DEFAULT_EXTENSIONS, max_bytes, seed, skip_dirs)
    report.documents_in = len(docs)
    docs = _clean(docs, report, max_line_length, clean)
    if not docs:
        raise DataError(f"data.path: {path}: no usable documents ({_found(report)})")
    if len(docs) < _MIN_DOCUMENTS:
        docs = _chunk(docs)
    if len(docs) < 2:
        raise DataError(f"data.path: {path}: one short document cannot be split into training and validation")
    train, validation = _split(docs, validation_split, seed)
    _overlap(train, validation, report)
    report.documents = len(docs)
    report.train_documents, report.validation_documents = len(train), len(validation)
    for doc in docs:
        report.kinds[doc.kind] = report.kinds.get(doc.kind, 0) + 1
    digest = hashlib.sha256()
    for doc in train + validation:
        digest.update(doc.key().encode())
    return Corpus(tuple(train), tuple(validation), report, digest.hexdigest())


def _found(report: CorpusReport) -> str:
    found = ", ".join(f"{i['check']}: {i['count']}" for i in report.issues)
    return f"{report.files} files read" + (f"; {found}" if found else "")


def _read_files(
    root: Path,
    report: CorpusReport,
    extensions: tuple[str, ...],
    max_bytes: int | None,
    seed: int,
    skip_dirs: frozenset[str],
) -> list[Document]:
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if root.is_file():
        files = [root]
    else:
        files = [
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in wanted
            and not any(part.startswith(".") or part in skip_dirs for part in p.relative_to(root).parts[:-1])
            and not p.name.startswith(".")
        ]
    if not files:
        raise DataError(f"data.path: {root}: no files with extension {', '.join(sorted(wanted))}")
    # A byte cap takes a seeded sample across the whole tree, not the first folders in order.
    files.sort()
    random.Random(seed).shuffle(files)
    docs: list[Document] = []
    binary = undecodable = undecodable_files = 0
    for file in files:
        if max_bytes is not None and report.bytes >= max_bytes:
            break
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise DataError(f"data.path: {file}: cannot read: {exc}") from exc
        report.files += 1
        if b"\x00" in raw[:8192]:
            binary += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            bad = text.count("\ufffd")
            if bad > len(text) // 10:
                binary += 1  # mostly not UTF-8: a binary file with another extension
                continue
            undecodable += bad
            undecodable_files += 1
            text = text.replace("\ufffd", "")
        report.bytes += len(raw)
        docs.append(Document(source=str(file), kind="text", text=text))
    report.issue("binary_files", binary, f"{binary} files are binary or not UTF-8", "skipped")
    report.issue(
        "undecodable_bytes",
        undecodable,
        f"{undecodable} bytes in {undecodable_files} files are not valid UTF-8",
        "removed",
    )
    return docs


def _read_jsonl(path: Path, report: CorpusReport) -> list[Document]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.path: {path}: cannot read: {exc}") from exc
    report.files, report.bytes = 1, len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{bad_line}: not valid UTF-8 (byte {exc.start})") from exc
    docs: list[Document] = []
    blank = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
        docs.append(_example(item, f"{path}:{number}"))
    report.issue("blank_lines", blank, f"{blank} blank lines in the JSONL file", "skipped")
    return docs


def _example(item: Any, where: str) -> Document:
    if not isinstance(item, dict):
        raise DataError(f"{where}: a JSONL line must be an object with text, prompt/completion or messages")
    if "messages" in item:
        return _chat(item["messages"], where)
    if "prompt" in item or "completion" in item:
        prompt, completion = item.get("prompt"), item.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: prompt and completion must both be strings")
        return Document(source=where, kind="completion", text=prompt + completion, prompt=prompt)
    if "text" in item:
        if not isinstance(item["text"], str):
            raise DataError(f"{where}: text must be a string")
        return Document(source=where, kind="text", text=item["text"])
    keys = ", ".join(sorted(item)) or "none"
    raise DataError(f"{where}: expected a text, prompt/completion or messages field (found: {keys})")


def _chat(messages: Any, where: str) -> Document:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{index}] must be an object with a string content")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{index}].role {role!r} is not one of {', '.join(ROLES)}")
        turns.append((str(role), str(message["content"])))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: the chat example has no assistant turn (nothing to learn to answer)")
    text = "\n".join(content for _, content in turns)
    return Document(source=where, kind="chat", text=text, messages=tuple(turns))


def _clean(docs: list[Document], report: CorpusReport, max_line_length: int, clean: bool) -> list[Document]:
    kept: list[Document] = []
    seen: set[str] = set()
    empty = duplicates = long_lines = long_docs = 0
    for doc in docs:
        if not doc.text.strip():
            empty += 1
            continue
        if doc.kind == "text":
            lines = doc.text.split("\n")
            long = sum(len(line) > max_line_length for line in lines)
            if long:
                long_lines += long
                long_docs += 1
                if clean:
                    doc = Document(
                        source=doc.source, kind="text", text="\n".join(x for x in lines if len(x) <= max_line_length)
                    )
                    if not doc.text.strip():
                        empty += 1
                        continue
        key = doc.key()
        if key in seen:
            duplicates += 1
            if clean:
                continue
        seen.add(key)
        kept.append(doc)
    report.issue("empty_documents", empty, f"{empty} documents are empty or whitespace", "dropped")
    report.issue(
        "duplicate_documents",
        duplicates,
        f"{duplicates} documents repeat an earlier one",
        "dropped" if clean else "kept (clean: false)",
    )
    report.issue(
        "long_lines",
        long_lines,
        f"{long_lines} lines in {long_docs} documents exceed {max_line_length} characters (data, not text)",
        "dropped" if clean else "kept (clean: false)",
    )
    return kept


def _chunk(docs: list[Document]) -> list[Document]:
    """Cut long plain-text documents at line boundaries into pieces of about _CHUNK_CHARS."""
    out: list[Document] = []
    for doc in docs:
        if doc.kind != "text" or len(doc.text) <= _CHUNK_CHARS:
            out.append(doc)
            continue
        piece: list[str] = []
        size = 0
        for line in doc.text.split("\n"):
            piece.append(line)
            size += len(line) + 1
            if size >= _CHUNK_CHARS:
                out.append(Document(source=f"{doc.source}#{len(out)}", kind="text", text="\n".join(piece)))
                piece, size = [], 0
        if "".join(piece).strip():
            out.append(Document(source=f"{doc.source}#{len(out)}", kind="text", text="\n".join(piece)))
    return out


def _split(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    val_rows = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_rows]
    validation = [d for i, d in enumerate(docs) if i in val_rows]
    return train, validation


def _overlap(train: list[Document], validation: list[Document], report: CorpusReport) -> None:
    """Report validation lines that also occur in training (licence headers, boilerplate)."""
    seen = {line.strip() for doc in train for line in doc.text.split("\n") if len(line.strip()) >= _OVERLAP_LINE_CHARS}
    total = shared = 0
    for doc in validation:
        for line in doc.text.split("\n"):
            if len(line.strip()) >= _OVERLAP_LINE_CHARS:
                total += 1
                shared += line.strip() in seen
    if shared:
        report.issue(
            "train_validation_overlap",
            shared,
            f"{shared} of {total} validation lines ({100 * shared / total:.1f} %) also occur in training",
            "reported (whole duplicate documents were dropped before the split)",
        )
