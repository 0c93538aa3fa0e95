"""Bad task files fail with one message that names the field, before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hub.training.errors import DataError, SpecError
from hub.training.progress import Progress
from hub.training.runner import train_task
from hub.training.spec import load_spec, parse_spec
from tests.support.paths import EXAMPLES

GOOD = """\
task: tabular-classification
data: {path: data.csv, target: label}
model: {candidates: [mlp-small]}
search: {trials: 1, cv_folds: 2}
training: {epochs: 2}
publish: {model: demo}
"""


def _error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return str(info.value)


@pytest.mark.parametrize("name", ["digits", "churn", "reviews"])
def test_examples_are_valid(name: str) -> None:
    spec = load_spec(EXAMPLES / name / "task.yaml")
    assert spec.publish.model


def test_yaml_syntax_error_gives_the_line() -> None:
    message = _error(GOOD.replace("model: {candidates: [mlp-small]}", "model: {candidates: [mlp-small}"))
    assert "line 3" in message and "YAML syntax error" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("task: tabular-classification", "task: video-magic", "task: Input should be"),
        ("[mlp-small]", "[mlp-small, resnet-9000]", "model.candidates[1]: unknown candidate 'resnet-9000'"),
        ("training: {epochs: 2}", "training: {epochs: 2, optimizer: rmsprop}", "training.optimizer: Input should be"),
        ("training: {epochs: 2}", "training: {epochs: 2, epochz: 3}", "training.epochz: unknown field"),
        (
            "training: {epochs: 2}",
            "training: {epochs: 0}",
            "training.epochs: Input should be greater than or equal to 1",
        ),
        ("search: {trials: 1, cv_folds: 2}", "search: {trials: 1, metric: rmse}", "search.metric: metric 'rmse'"),
        ("data: {path: data.csv, target: label}", "data: {path: data.csv}", "data.target: required"),
        ("publish: {model: demo}\n", "", "publish: field required"),
    ],
)
def test_bad_field_is_named(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    message = _error(GOOD.replace(old, new))
    assert expected in message, message


def test_field_errors_carry_the_yaml_line() -> None:
    message = _error(GOOD.replace("training: {epochs: 2}", "training: {epochs: 2, optimizer: rmsprop}"))
    assert message.startswith("task.yaml: line 5: training.optimizer")


def test_rejected_value_is_shown() -> None:
    assert "(got 'rmsprop')" in _error(GOOD.replace("{epochs: 2}", "{optimizer: rmsprop}"))


class _Recorder(Progress):
    def __init__(self) -> None:
        self.trials = 0

    def trial_started(self, number: int, params: dict[str, object]) -> None:
        self.trials += 1


@pytest.mark.parametrize(
    ("csv", "target", "expected"),
    [
        ("a,b\n1,x\n2,y\n", "label", "data.target: column 'label' is not in data.csv (columns: a, b)"),
        ("a,label\n", "label", "data.path: 'data.csv' has no usable rows"),
        ("a,label\n1,x\n2,x\n3,x\n4,x\n5,x\n", "label", "data.target: a single class ('x')"),
        ("a,label\n1,x\n2,x\n3,x\n4,x\n5,y\n", "label", "classes 'y' (1) have fewer than"),
    ],
)
def test_unusable_data_fails_before_training(tmp_path: Path, csv: str, target: str, expected: str) -> None:
    (tmp_path / "data.csv").write_text(csv)
    spec = parse_spec(GOOD.replace("target: label", f"target: {target}"), base_dir=tmp_path)
    recorder = _Recorder()
    with pytest.raises(DataError) as info:
        train_task(spec, tmp_path, progress=recorder)
    assert expected in str(info.value)
    assert recorder.trials == 0


def test_cli_reports_one_clear_line(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(GOOD.replace("[mlp-small]", "[mlp-huge]"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "autodl-hub"), "train", str(task), "--data-dir", str(tmp_path / "hub")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model.candidates[0]: unknown candidate 'mlp-huge'" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_candidate_may_be_a_local_hugging_face_dir(tmp_path: Path) -> None:
    from hub.training.zoo import minilm_dir

    text = """
task: text-classification
data: {path: t.csv, target: label}
model: {candidates: [CANDIDATE]}
publish: {model: t}
"""
    spec = parse_spec(text.replace("CANDIDATE", str(minilm_dir())), base_dir=tmp_path)
    assert spec.model.candidates == [str(minilm_dir())]
    (tmp_path / "not-a-model").mkdir()
    message = _error(text.replace("CANDIDATE", "not-a-model"))
    assert "model.candidates[0]: unknown candidate 'not-a-model'" in message
    assert "or a local Hugging Face model directory" in message
