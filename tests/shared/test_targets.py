from __future__ import annotations

import pytest

from shared.targets import DeviceProfile, TargetId, choose_targets

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (DeviceProfile(cpu_flags=["avx2", "avx512_vnni"]), ["cpu-int4", "cpu-int8", "cpu-fp32"]),
        (DeviceProfile(arch="aarch64", cpu_flags=["asimd", "asimddp"]), ["cpu-int4", "cpu-int8", "cpu-fp32"]),
        (DeviceProfile(cpu_flags=["sse4_2", "avx2"]), ["cpu-int4", "cpu-int8", "cpu-fp32"]),
        (DeviceProfile(cpu_flags=["sse4_2"]), ["cpu-int4", "cpu-fp32", "cpu-int8"]),
        (DeviceProfile(arch="aarch64", cpu_flags=["asimd"]), ["cpu-int4", "cpu-fp32", "cpu-int8"]),
        (
            DeviceProfile(cpu_flags=["sse4_2"], providers=[CUDA, CPU], cuda_devices=["NVIDIA A2"]),
            ["cuda-int4", "cuda-fp16", "cpu-int4", "cpu-fp32", "cpu-int8"],
        ),
        (
            DeviceProfile(cpu_flags=["avx512_vnni"], providers=[TRT, CUDA, CPU], cuda_devices=["L4"]),
            ["cuda-int8", "cuda-int4", "cuda-fp16", "cpu-int4", "cpu-int8", "cpu-fp32"],
        ),
        # a CUDA provider without a visible GPU is not a GPU device
        (DeviceProfile(providers=[CUDA, CPU]), ["cpu-int4", "cpu-fp32", "cpu-int8"]),
        (
            DeviceProfile(arch="aarch64", cpu_flags=["asimddp"], providers=[TRT, CUDA, CPU], jetson=True),
            ["jetson-trt-int8", "jetson-fp16", "cpu-int4", "cpu-int8", "cpu-fp32"],
        ),
        (
            DeviceProfile(arch="aarch64", providers=[CUDA, CPU], jetson=True),
            ["jetson-fp16", "cpu-int4", "cpu-fp32", "cpu-int8"],
        ),
    ],
)
def test_choice_of_targets_per_profile(profile: DeviceProfile, expected: list[str]) -> None:
    assert choose_targets(profile) == [TargetId(t) for t in expected]
