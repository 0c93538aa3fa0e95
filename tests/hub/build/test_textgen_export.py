"""Tiny Llama, Qwen2, Qwen3 and GLM checkpoints made in the test export with the model builder
(GLM via the ChatGLM relabel), and the shared loop's greedy output over each graph equals torch's.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from hub.build.lm_export import BuiltFolder, ExportJob, prepare_source, run_builder
from hub.build.lm_reference import eos_ids, load_causal_lm, torch_greedy
from hub.build.textgen_request import checkpoint_config
from shared.generation import SamplingParams, load_model
from shared.targets import TargetId
from tests.support.lm_checkpoints import FAMILIES, make_checkpoint

pytestmark = pytest.mark.slow
PROMPTS = ([5, 17, 40, 99, 3], [200, 11])
N = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, BuiltFolder]]:
    root = tmp_path_factory.mktemp("families")
    jobs, checkpoints = [], {}
    for family in FAMILIES:
        checkpoint = make_checkpoint(root / family, family, steps=0, seed=1)
        source, relabel = prepare_source(checkpoint, root / f"work-{family}")
        assert (relabel == "ChatGLMModel") == (family == "glm")
        checkpoints[family] = checkpoint
        jobs.append(ExportJob(TargetId.CPU_FP32, root / "out" / family, source=source))
    jobs.append(
        ExportJob(
            TargetId.CPU_INT4,
            root / "out" / "llama-int4",
            {"block_size": "32", "accuracy_level": "4"},
            source=checkpoints["llama"],
        )
    )
    built = run_builder(checkpoints["llama"], jobs, root / "work")
    return {
        **{family: (checkpoints[family], b) for family, b in zip(FAMILIES, built, strict=False)},
        "llama-int4": (checkpoints["llama"], built[-1]),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_exports_and_its_onnx_greedy_output_equals_torch(
    exported: dict[str, tuple[Path, BuiltFolder]], family: str
) -> None:
    checkpoint, built = exported[family]
    assert built.error is None and built.folder is not None, built.error
    model = load_model(built.folder, threads=1)
    torch_model = load_causal_lm(checkpoint)
    assert eos_ids(checkpoint, checkpoint_config(checkpoint)) == [0]
    for prompt in PROMPTS:
        # Random weights: EOS may come at any step, so both sides decode through it.
        want = torch_greedy(torch_model, prompt, N, [])
        got = list(model.generate(prompt, SamplingParams(max_new_tokens=N, ignore_eos=True)))
        assert len(want) >= 4 and len(set(want)) > 1, "the test model should say something"
        assert got == want, f"{family}: ONNX {got} vs torch {want}"


def test_cpu_int4_is_matmulnbits_block_32_with_fused_attention(exported: dict[str, tuple[Path, BuiltFolder]]) -> None:
    _, built = exported["llama-int4"]
    assert built.folder is not None, built.error
    graph = onnx.load(str(built.folder / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert blocks == {32} and bits == {4}
    assert "MatMul" not in ops or all(n.op_type != "MatMul" for n in graph.node if "proj" in n.name)
