"""A tiny language model for agent tests: a byte-level BPE and a bigram ONNX graph with a real KV cache.

The graph has the model builder's interface (`input_ids`, `attention_mask`,
`past_key_values.{i}.key/value` in; `logits`, `present.{i}.key/value` out), so the one
generation loop runs it as it runs an exported model. Its logits are a bigram table made
so that greedy decoding writes SCRIPT (Chinese and emoji included, split over byte
tokens) after the chat prompt; the reference greedy output is computed here with numpy.
Built in milliseconds, so agent tests need neither torch nor the model builder; the
e2e test exports a real model with the hub.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.generation import SamplingParams, load_model
from shared.manifest import (
    GenerationDefaults,
    GenerationMetrics,
    GenerationSpec,
    KvCacheLayout,
    Manifest,
    SamplePrompt,
    TensorSpec,
    Variant,
    VariantFile,
    VariantMetrics,
    sign_manifest,
)
from shared.targets import TargetId
from tests.support.models import Release

# Every token of SCRIPT is distinct (the bigram table needs that); 你 (E4 BD A0), 界 (E7 95 8C)
# and 🚀 (F0 9F 9A 80) share no byte, and the tokenizer never saw them, so each is 3-4 byte tokens.
SCRIPT = "Edge models speak 你界🚀 safely, one token at a time."
TRAINING = [
    "Edge models speak safely, one token at a time.",
    "user assistant system Hi hello",
    "def f(x):\n    return x",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAYERS, HEADS, HEAD_SIZE = 2, 2, 4
CONTEXT = 96
FOLDER = "cpu-fp32"


def tokenizer() -> Tokenizer:
    """A byte-level BPE, small enough that a Chinese character or an emoji spans several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAINING * 10, trainer)
    ids = tok.encode(SCRIPT).ids
    if len(set(ids)) != len(ids) or tok.encode("\n").ids[-1] in ids:
        raise AssertionError(f"SCRIPT repeats a token: {tok.encode(SCRIPT).tokens}")
    return tok


def bigram_table(tok: Tokenizer, endless: bool = False) -> np.ndarray:
    """Logits [vocab, vocab]: after each token of SCRIPT its successor, after the last one EOS.

    The assistant turn starts after "\\n", so "\\n" leads to SCRIPT's first token. Small noise
    elsewhere gives sampling something to choose from. `endless`: SCRIPT starts over instead
    of EOS (a model that never ends, the case max_tokens and disconnects must bound).
    """
    vocab = tok.get_vocab_size()
    table = np.random.default_rng(0).normal(0, 0.5, size=(vocab, vocab)).astype(np.float32)
    ids = tok.encode(SCRIPT).ids
    eos = tok.token_to_id("<|endoftext|>")
    newline = tok.encode("\n").ids[-1]
    chain = [newline, *ids, ids[0] if endless else eos]
    for a, b in zip(chain, chain[1:], strict=False):
        table[a, b] = 12.0 + table[a].max()
    return table


def reference_greedy(table: np.ndarray, prompt_ids: list[int], eos: int, limit: int) -> list[int]:
    """Return the bigram model's greedy continuation, without the EOS."""
    out: list[int] = []
    last = prompt_ids[-1]
    for _ in range(limit):
        last = int(np.argmax(table[last]))
        if last == eos:
            break
        out.append(last)
    return out


def bigram_onnx(table: np.ndarray, seed: int = 1, slow_steps: int = 0) -> bytes:
    """Return the graph: logits = table[input_ids]; each layer's cache grows by an embedding of the ids.

    `slow_steps` adds that many 1024x1024 MatMuls per token whose result is multiplied by
    zero: the same tokens, at the pace of a bigger model (for disconnect and concurrency tests).
    """
    vocab = table.shape[0]
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(table, "bigram"),
        numpy_helper.from_array(np.array([1, -1, HEADS, HEAD_SIZE], np.int64), "kv_shape"),
    ]
    if slow_steps:
        width = 1024
        inits += [
            numpy_helper.from_array(rng.normal(0, 0.03, size=(vocab, width)).astype(np.float32), "slow_emb"),
            numpy_helper.from_array(rng.normal(0, 0.03, size=(width, width)).astype(np.float32), "slow_w"),
            numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
        nodes = [helper.make_node("Gather", ["slow_emb", "input_ids"], ["slow_0"], axis=0)]
        for j in range(slow_steps):
            nodes += [
                helper.make_node("MatMul", [f"slow_{j}", "slow_w"], [f"slow_{j}.m"]),
                helper.make_node("Tanh", [f"slow_{j}.m"], [f"slow_{j + 1}"]),
            ]
        nodes += [
            helper.make_node("ReduceSum", [f"slow_{slow_steps}", "last_axis"], ["slow_sum"], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "zero"], ["slow_zero"]),
            helper.make_node("Gather", ["bigram", "input_ids"], ["bigram_logits"], axis=0),
            helper.make_node("Add", ["bigram_logits", "slow_zero"], ["logits"]),
        ]
    else:
        nodes = [helper.make_node("Gather", ["bigram", "input_ids"], ["logits"], axis=0)]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            emb = f"emb.{i}.{kind}"
            inits.append(numpy_helper.from_array(rng.normal(size=(vocab, HEADS * HEAD_SIZE)).astype(np.float32), emb))
            nodes += [
                helper.make_node("Gather", [emb, "input_ids"], [f"{emb}.g"], axis=0),
                helper.make_node("Reshape", [f"{emb}.g", "kv_shape"], [f"{emb}.r"]),
                helper.make_node("Transpose", [f"{emb}.r"], [f"{emb}.t"], perm=[0, 2, 1, 3]),
                helper.make_node(
                    "Concat", [f"past_key_values.{i}.{kind}", f"{emb}.t"], [f"present.{i}.{kind}"], axis=2
                ),
            ]
            shape: list[int | str] = [1, HEADS, "past", HEAD_SIZE]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, shape))
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [1, HEADS, "total", HEAD_SIZE])
            )
    graph = helper.make_graph(nodes, "bigram-lm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class TinyLM:
    """A text-generation release and what tests compare against."""

    release: Release
    tokenizer: Tokenizer
    table: np.ndarray

    @property
    def eos(self) -> int:
        return int(self.tokenizer.token_to_id("<|endoftext|>"))

    def chat_prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        turns = ([("system", system)] if system else []) + [("user", user)]
        text = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def greedy_text(self, prompt_ids: list[int], limit: int = 200) -> str:
        ids = reference_greedy(self.table, prompt_ids, self.eos, limit)
        return str(self.tokenizer.decode(ids))


def genai(tok: Tokenizer, table: np.ndarray, context: int) -> dict[str, object]:
    """Return an ORT GenAI genai_config.json for the bigram graph (a concatenating, unshared KV cache)."""
    eos = int(tok.token_to_id("<|endoftext|>"))
    return {
        "model": {
            "type": "llama",
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "context_length": context,
            "vocab_size": int(table.shape[0]),
            "decoder": {
                "filename": "model.onnx",
                "head_size": HEAD_SIZE,
                "hidden_size": HEADS * HEAD_SIZE,
                "num_attention_heads": HEADS,
                "num_key_value_heads": HEADS,
                "num_hidden_layers": LAYERS,
                "session_options": {"provider_options": []},
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
            },
        },
        "search": {"max_length": context, "past_present_share_buffer": False, "do_sample": False},
    }


def spec(tok: Tokenizer, table: np.ndarray, wrong_parity: bool = False, context: int = CONTEXT) -> GenerationSpec:
    eos = int(tok.token_to_id("<|endoftext|>"))
    prompt = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    expected = reference_greedy(table, prompt, eos, 8)
    if wrong_parity:
        expected = [(t + 1) % table.shape[0] for t in expected]  # the model will not reproduce these
    return GenerationSpec(
        chat_template=CHATML,
        eos_token_ids=[eos],
        context_length=context,
        vocab_size=table.shape[0],
        defaults=GenerationDefaults(max_new_tokens=64, temperature=0.0),
        kv_cache=KvCacheLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_size=HEAD_SIZE),
        samples=[SamplePrompt(text="Hi", prompt_ids=prompt, expected_ids=expected)],
        parity_tokens=8,
        tokenizer_config_file=None,
    )


def make_lm_release(
    key: Ed25519PrivateKey,
    name: str,
    version: str,
    *,
    wrong_parity: bool = False,
    slow_steps: int = 0,
    context: int = CONTEXT,
    genai_config: bool = False,
) -> TinyLM:
    """Build, describe and sign a text-generation version whose variant is a folder of files.

    A slow model (`slow_steps`) is an endless one too (see bigram_table).
    """
    tok = tokenizer()
    table = bigram_table(tok, endless=slow_steps > 0)
    graph = bigram_onnx(table, slow_steps=slow_steps)
    tokenizer_json = tok.to_str().encode()
    contents = {"model.onnx": graph, "tokenizer.json": tokenizer_json}
    if genai_config:  # what the model builder writes, for the ORT GenAI backend
        contents["genai_config.json"] = json.dumps(genai(tok, table, context)).encode()
    files = [
        VariantFile(path=f"{FOLDER}/{n}", size=len(b), sha256=hashlib.sha256(b).hexdigest())
        for n, b in contents.items()
    ]
    graph_file = files[0]
    manifest = Manifest(
        name=name,
        version=version,
        task="text-generation",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=[1, "sequence"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, "sequence", table.shape[0]])],
        generation=spec(tok, table, wrong_parity, context),
        variants=[
            Variant(
                target=TargetId.CPU_FP32,
                precision="fp32",
                providers=["CPUExecutionProvider"],
                file=graph_file.path,
                size=graph_file.size,
                sha256=graph_file.sha256,
                files=files,
                metrics=VariantMetrics(
                    metric="perplexity", generation=GenerationMetrics(parity_matched=8, parity_tokens=8)
                ),
            )
        ],
    )
    release = Release(
        name,
        version,
        sign_manifest(manifest, key),
        {f.sha256: contents[f.path.split("/", 1)[1]] for f in files},
    )
    return TinyLM(release, tok, table)


def loop_greedy(folder: str, tiny: TinyLM, prompt_ids: list[int], limit: int) -> list[int]:
    """Run the shared loop in-process on a written folder (the in-process reference path)."""
    model = load_model(folder, spec=tiny.release.manifest.generation)
    return list(model.generate(prompt_ids, SamplingParams(max_new_tokens=limit)))
