"""The one generation loop for language models, over plain ONNX Runtime.

Used by the hub's build gate, `bench/generation.py` and the agent's text-generation server.
Needs numpy, onnxruntime and (for text) tokenizers, which the hub and agent extras install;
never torch, the hub or the agent. `import shared` does not import this package.

    model = load_model(folder)                       # graph + genai_config.json or a GenerationSpec
    for token in model.generate(prompt_ids, SamplingParams(max_new_tokens=64)):
        ...                                          # one id at a time; .finish_reason afterwards
    model.perplexity([ids, ...])                     # the gate's quality measure
    model.kv_bytes_per_token                         # the agent sizes concurrency from it
    BatchedModel(model, slots).generate(...)         # the same, sequences in flight decoding as one batch
                                                     # (shared.generation.batch; GroupQueryAttention graphs)

Errors::

    GenerationError (ValueError)    a folder, graph or request the loop cannot run
"""

from __future__ import annotations

from shared.generation.config import layout_from_genai_config, read_genai_config, spec_from_genai_config
from shared.generation.errors import GenerationError
from shared.generation.loop import FinishReason, Generation, GenerationModel, load_model
from shared.generation.sampling import SamplingParams, choose_token
from shared.generation.text import TextStream, load_tokenizer

__all__ = [
    "FinishReason",
    "Generation",
    "GenerationError",
    "GenerationModel",
    "SamplingParams",
    "TextStream",
    "choose_token",
    "layout_from_genai_config",
    "load_model",
    "load_tokenizer",
    "read_genai_config",
    "spec_from_genai_config",
]
