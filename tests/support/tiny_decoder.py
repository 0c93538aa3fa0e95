"""A tiny causal decoder written directly in ONNX (standard ops), with the model builder's
interface: input_ids, attention_mask, past_key_values.{i}.key/value in; logits, present.{i}.* out.

It is a real attention model (causal mask over past + new tokens), so a loop that mishandles
the cache gives different tokens than running the whole sequence at once. With `gqa=True` its
attention is ONNX Runtime's GroupQueryAttention, as the model builder writes it: present is
past's buffer (share_buffer: True in genai_config) when the caller binds them to one buffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, KV_HEADS, HEAD_SIZE, LAYERS = 64, 32, 2, 16, 2


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def build_graph(path: Path, *, seed: int = 0, position_ids: bool = False, gqa: bool = False) -> None:
    """Write the decoder to `path` (weights inline; a few KB)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("embed", rng.normal(0, 1.0, (VOCAB, HIDDEN))),
        _init("lm_head", rng.normal(0, 0.6, (HIDDEN, VOCAB))),
        _init("scale", np.array(1 / np.sqrt(HEAD_SIZE))),
        _init("big", np.array(1e9)),
        _init("one", np.array(1.0)),
        numpy_helper.from_array(np.array([0, -1, KV_HEADS, HEAD_SIZE], dtype=np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, -1, HIDDEN], dtype=np.int64), "hidden_shape"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "axis3"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), "axis4"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero1"),
    ]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x0"])]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    # Learned positions. optimum-style graphs take position_ids; the builder's derive them from
    # the attention mask (here: cumsum(mask) - 1 of the new tokens), so a wrong mask shows.
    inits += [
        _init("pos_embed", rng.normal(0, 1.0, (256, HIDDEN))),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "i1"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "i1s"),
        numpy_helper.from_array(np.array([1 << 30], dtype=np.int64), "end"),
    ]
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        positions = "position_ids"
    else:
        nodes += [
            helper.make_node("CumSum", ["attention_mask", "i1s"], ["cs"]),
            helper.make_node("Sub", ["cs", "i1s"], ["cs0"]),
            helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
            helper.make_node("Slice", ["ids_shape", "i1", "axis2"], ["new_len"]),
            helper.make_node("Neg", ["new_len"], ["neg_len"]),
            helper.make_node("Slice", ["cs0", "neg_len", "end", "i1"], ["positions"]),
        ]
        positions = "positions"
    nodes += [
        helper.make_node("Gather", ["pos_embed", positions], ["pe"]),
        helper.make_node("Add", ["x0", "pe"], ["x0p"]),
    ]
    x = "x0p"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for i in range(LAYERS):
        p = f"l{i}_"
        for w in ("wq", "wk", "wv", "wo"):
            inits.append(_init(p + w, rng.normal(0, 0.5, (HIDDEN, HIDDEN))))
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [
            helper.make_tensor_value_info(past_k, TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_SIZE]),
            helper.make_tensor_value_info(past_v, TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_SIZE]),
        ]
        outputs += [
            helper.make_tensor_value_info(
                f"present.{i}.key", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_SIZE]
            ),
            helper.make_tensor_value_info(
                f"present.{i}.value", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_SIZE]
            ),
        ]
        if gqa:
            nodes += _gqa_attention(p, x, i)
            x = p + "out"
            continue
        for name in ("q", "k", "v"):
            nodes += [
                helper.make_node("MatMul", [x, p + "w" + name], [p + name + "_flat"]),
                helper.make_node("Reshape", [p + name + "_flat", "heads_shape"], [p + name + "_h"]),
                helper.make_node("Transpose", [p + name + "_h"], [p + name + "_t"], perm=[0, 2, 1, 3]),
            ]
        nodes += [
            helper.make_node("Concat", [past_k, p + "k_t"], [f"present.{i}.key"], axis=2),
            helper.make_node("Concat", [past_v, p + "v_t"], [f"present.{i}.value"], axis=2),
            helper.make_node("Transpose", [f"present.{i}.key"], [p + "kT"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [p + "q_t", p + "kT"], [p + "s_raw"]),
            helper.make_node("Mul", [p + "s_raw", "scale"], [p + "s"]),
            # causal mask over [new, past + new]: query j sees keys up to past + j (Trilu, k = past)
            helper.make_node("Shape", [p + "s"], [p + "s_shape"]),
            helper.make_node("Slice", [p + "s_shape", "axis2", "axis3"], [p + "t"]),
            helper.make_node("Slice", [p + "s_shape", "axis3", "axis4"], [p + "n"]),
            helper.make_node("Sub", [p + "n", p + "t"], [p + "past1"]),
            helper.make_node("Squeeze", [p + "past1", "zero1"], [p + "past"]),
            helper.make_node("Concat", [p + "t", p + "n"], [p + "tn"], axis=0),
            helper.make_node("ConstantOfShape", [p + "tn"], [p + "ones"], value=_init("v1", np.array([1.0]))),
            helper.make_node("Trilu", [p + "ones", p + "past"], [p + "tri"], upper=0),
            helper.make_node("Sub", [p + "tri", "one"], [p + "neg"]),
            helper.make_node("Mul", [p + "neg", "big"], [p + "mask"]),
            helper.make_node("Add", [p + "s", p + "mask"], [p + "sm"]),
            helper.make_node("Softmax", [p + "sm"], [p + "a"], axis=-1),
            helper.make_node("MatMul", [p + "a", f"present.{i}.value"], [p + "o_h"]),
            helper.make_node("Transpose", [p + "o_h"], [p + "o_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "o_t", "hidden_shape"], [p + "o"]),
            helper.make_node("MatMul", [p + "o", p + "wo"], [p + "proj"]),
            helper.make_node("Add", [x, p + "proj"], [p + "res"]),
            helper.make_node("Tanh", [p + "res"], [p + "out"]),
        ]
        x = p + "out"
    if gqa:  # the builder's attn_mask_reformat: seqlens_k = sum(mask) - 1, total = mask's length
        nodes = [
            helper.make_node("ReduceSum", ["attention_mask", "i1"], ["mask_sum"], keepdims=0),
            helper.make_node("Sub", ["mask_sum", "i1"], ["seqlens64"]),
            helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32),
            helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
            helper.make_node("Gather", ["mask_shape", "i1s"], ["total64"]),
            helper.make_node("Cast", ["total64"], ["total_len"], to=TensorProto.INT32),
            *nodes,
        ]
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), *([helper.make_opsetid("com.microsoft", 1)] if gqa else [])]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if not gqa:  # the checker does not know com.microsoft's ops
        onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _gqa_attention(p: str, x: str, layer: int) -> list[onnx.NodeProto]:
    """Return one layer's attention as GroupQueryAttention (no rotary: positions are learned)."""
    return [
        *(helper.make_node("MatMul", [x, p + "w" + name], [p + name]) for name in ("q", "k", "v")),
        helper.make_node(
            "GroupQueryAttention",
            [p + "q", p + "k", p + "v", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
            + ["seqlens_k", "total_len"],
            [p + "o", f"present.{layer}.key", f"present.{layer}.value"],
            domain="com.microsoft",
            num_heads=KV_HEADS,
            kv_num_heads=KV_HEADS,
            scale=float(1 / np.sqrt(HEAD_SIZE)),
        ),
        helper.make_node("MatMul", [p + "o", p + "wo"], [p + "proj"]),
        helper.make_node("Add", [x, p + "proj"], [p + "res"]),
        helper.make_node("Tanh", [p + "res"], [p + "out"]),
    ]


def genai_config(*, eos: int = VOCAB - 1, context_length: int = 128, share_buffer: bool = False) -> dict[str, object]:
    """Return a genai_config.json as the model builder writes it, for this decoder."""
    return {
        "model": {
            "bos_token_id": 0,
            "context_length": context_length,
            "decoder": {
                "filename": "model.onnx",
                "head_size": HEAD_SIZE,
                "hidden_size": HIDDEN,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": KV_HEADS,
                "num_hidden_layers": LAYERS,
                "num_key_value_heads": KV_HEADS,
            },
            "eos_token_id": [eos],
            "pad_token_id": eos,
            "type": "llama",
            "vocab_size": VOCAB,
        },
        "search": {
            "do_sample": False,
            "max_length": context_length,
            "past_present_share_buffer": share_buffer,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_folder(folder: Path, *, gqa: bool = False, **config: object) -> Path:
    """Write a variant folder: model.onnx and genai_config.json (GroupQueryAttention shares its buffer)."""
    folder.mkdir(parents=True, exist_ok=True)
    build_graph(folder / "model.onnx", gqa=gqa)
    config.setdefault("share_buffer", gqa)
    (folder / "genai_config.json").write_text(json.dumps(genai_config(**config)))  # type: ignore[arg-type]
    return folder
