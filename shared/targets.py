"""Target ids, device profiles, and the ordered choice of targets for a device.

A *target* is one way to run a model: a precision and the execution providers that
run it. The hub builds one artifact variant per target; an agent picks the first
target of its preference list that the manifest offers.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "TARGET_PROVIDERS",
    "TARGET_PRECISION",
    "GENERATION_TARGETS",
    "DeviceProfile",
    "TargetId",
    "choose_targets",
    "fast_int8_cpu",
]


class TargetId(StrEnum):
    """Every target a manifest variant can be built for."""

    CPU_FP32 = "cpu-fp32"
    CPU_INT8 = "cpu-int8"
    CPU_INT4 = "cpu-int4"
    CUDA_FP16 = "cuda-fp16"
    CUDA_INT8 = "cuda-int8"
    CUDA_INT4 = "cuda-int4"
    JETSON_FP16 = "jetson-fp16"
    JETSON_TRT_INT8 = "jetson-trt-int8"


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# Execution providers per target, in order of preference; CPU is always the last resort.
TARGET_PROVIDERS: dict[TargetId, tuple[str, ...]] = {
    TargetId.CPU_FP32: (CPU,),
    TargetId.CPU_INT8: (CPU,),
    TargetId.CPU_INT4: (CPU,),
    TargetId.CUDA_FP16: (CUDA, CPU),
    TargetId.CUDA_INT8: (TENSORRT, CUDA, CPU),
    TargetId.CUDA_INT4: (CUDA, CPU),
    TargetId.JETSON_FP16: (CUDA, CPU),
    TargetId.JETSON_TRT_INT8: (TENSORRT, CUDA, CPU),
}

TARGET_PRECISION: dict[TargetId, str] = {
    TargetId.CPU_FP32: "fp32",
    TargetId.CPU_INT8: "int8",
    TargetId.CPU_INT4: "int4",
    TargetId.CUDA_FP16: "fp16",
    TargetId.CUDA_INT8: "int8",
    TargetId.CUDA_INT4: "int4",
    TargetId.JETSON_FP16: "fp16",
    TargetId.JETSON_TRT_INT8: "int8",
}

# Targets of language models (weight-only quantized MatMuls with a KV cache); the int4 ones
# exist only for them. Classifier builds use the others.
GENERATION_TARGETS: tuple[TargetId, ...] = (
    TargetId.CPU_INT4,
    TargetId.CPU_INT8,
    TargetId.CPU_FP32,
    TargetId.CUDA_FP16,
    TargetId.CUDA_INT4,
)

# CPU flags (as /proc/cpuinfo spells them) with fast 8-bit multiply-accumulate. ONNX Runtime's
# MLAS has int8 GEMM kernels for AVX2 (vpmaddubsw) and faster ones for VNNI/AMX; on ARM it
# needs the dot-product extension. Measured on an AVX2-only EPYC: MiniLM int8 1.9x torch fp32,
# ORT fp32 1.2x. CPUs without any of these (SSE-only x86, ARMv8.0) run int8 slower than fp32.
_INT8_FLAGS = frozenset({"avx2", "avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8", "asimddp", "dotprod"})


class DeviceProfile(BaseModel):
    """What an agent knows about its hardware; sent at enrollment and in reported state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field(default="x86_64", max_length=32, description="machine architecture (uname -m)")
    os: str = Field(default="linux", max_length=64)
    cpu_flags: list[str] = Field(default_factory=list, max_length=512)
    cores: int = Field(default=1, ge=1, le=4096)
    memory_mb: int = Field(default=0, ge=0)
    disk_free_mb: int = Field(default=0, ge=0)
    providers: list[str] = Field(default_factory=lambda: [CPU], max_length=32)
    cuda_devices: list[str] = Field(default_factory=list, max_length=64)
    jetson: bool = False


def fast_int8_cpu(profile: DeviceProfile) -> bool:
    """Return True when the CPU has fast 8-bit multiply-accumulate (AVX2, VNNI, AMX, ARM dotprod)."""
    return any(flag.lower() in _INT8_FLAGS for flag in profile.cpu_flags)


def choose_targets(profile: DeviceProfile) -> list[TargetId]:
    """Return the targets this device can run, best first."""
    providers = set(profile.providers)
    choice: list[TargetId] = []
    if profile.jetson:
        if TENSORRT in providers:
            choice.append(TargetId.JETSON_TRT_INT8)
        if CUDA in providers:
            choice.append(TargetId.JETSON_FP16)
    elif CUDA in providers and profile.cuda_devices:
        if TENSORRT in providers:
            choice.append(TargetId.CUDA_INT8)
        # Decoding is memory-bound: 4-bit weights beat fp16 on a GPU (only LMs have them).
        choice += [TargetId.CUDA_INT4, TargetId.CUDA_FP16]
    # Language models: weight-only int4 decodes fastest on every CPU (MatMulNBits needs no
    # fast int8 multiply-accumulate); only language-model manifests offer it.
    choice.append(TargetId.CPU_INT4)
    # The hub publishes cpu-int8 only where it measured faster than fp32; on CPUs
    # without fast 8-bit multiply-accumulate the integer kernels lose, so fp32 comes first.
    if fast_int8_cpu(profile):
        choice += [TargetId.CPU_INT8, TargetId.CPU_FP32]
    else:
        choice += [TargetId.CPU_FP32, TargetId.CPU_INT8]
    return choice
