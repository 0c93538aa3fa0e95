"""Small corpora and task files for the text-generation tests (trained in seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_code_corpus(folder: Path, files: int = 24) -> Path:
    """Write `files` small Python-like files with learnable structure into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [f'"""Module {i}: arithmetic helpers."""', ""]
        for j in range(6):
            lines += [f"def add_{i}_{j}(x, y):", f"    return x + y + {i * j}", ""]
        (folder / f"mod_{i}.py").write_text("\n".join(lines))
    return folder


def write_chat_jsonl(path: Path, examples: int = 30) -> Path:
    """Write chat examples (user asks a sum, assistant answers) as JSONL."""
    rows = []
    for i in range(examples):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                ]
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def lm_task(data: Path, candidates: list[str], **sections: dict[str, Any]) -> str:
    """Return a text-generation task YAML with CI-sized budgets, `sections` merged in."""
    task: dict[str, Any] = {
        "task": "text-generation",
        "data": {"path": str(data), "validation_split": 0.2},
        "model": {"candidates": candidates, "auto_select": True, "max_length": 32, "vocab_size": 400},
        "training": {"batch_size": 4, "max_steps": 4, "select_steps": 3, "lr": 0.003, "seed": 0},
        "resource": {"threads": 1},
        "generation": {"context_length": 64, "max_new_tokens": 8},
        "publish": {"model": "lm-test"},
    }
    for section, values in sections.items():
        task.setdefault(section, {}).update(values)
    return yaml.safe_dump(task, sort_keys=False)
