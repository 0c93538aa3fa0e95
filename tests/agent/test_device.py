"""The device profile read from /proc/cpuinfo, /etc/nv_tegra_release and ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.device import cpu_flags, detect_profile, is_jetson, physical_cores
from shared.targets import TargetId, choose_targets

X86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni ht\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (X86, ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_2"]),
        (ARM, ["asimd", "asimddp", "neon"]),
        ("processor: 0\n", []),
    ],
)
def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_flags(path) == expected


def test_jetson_is_detected_from_the_tegra_release_file(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    assert not is_jetson(release)
    release.write_text("# R35 (release), REVISION: 3.1\n")
    assert is_jetson(release)


def test_profile_of_a_vnni_cpu_prefers_int8(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86)
    profile = detect_profile(tmp_path, cpuinfo=cpuinfo, tegra_release=tmp_path / "none")
    assert profile.cores >= 1 and profile.memory_mb > 0 and profile.disk_free_mb > 0
    assert "CPUExecutionProvider" in profile.providers
    assert not profile.jetson
    # cpu-int4 (language models only) leads; for every other model int8 comes before fp32.
    assert choose_targets(profile)[:3] == [TargetId.CPU_INT4, TargetId.CPU_INT8, TargetId.CPU_FP32]


def test_hyperthreads_of_one_core_count_once(tmp_path: Path) -> None:
    usable = sorted(os.sched_getaffinity(0))
    for cpu in usable:
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        topology.joinpath("core_cpus_list").write_text(f"{cpu // 2 * 2}-{cpu // 2 * 2 + 1}\n")  # pairs share a core
    assert physical_cores(tmp_path) == len({cpu // 2 for cpu in usable})
    assert physical_cores(tmp_path / "missing") == len(usable)  # no topology: logical CPUs
