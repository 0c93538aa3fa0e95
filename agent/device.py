"""The device's hardware profile: CPU flags, cores, memory, disk, ORT providers, CUDA, Jetson."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from shared.targets import DeviceProfile

__all__ = ["cpu_flags", "cuda_devices", "detect_profile", "is_jetson", "ort_providers", "physical_cores"]

logger = logging.getLogger(__name__)

# Flags worth reporting: they decide which variant runs fast here. The full list is long and noisy.
_INTERESTING = frozenset(
    {
        "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
        "avx512_vnni", "avx512vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
        "neon", "asimd", "asimdhp", "asimddp", "dotprod", "sve", "sve2", "i8mm", "bf16", "fphp",
    }
)  # fmt: skip


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Return the interesting CPU flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    found: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(flag.lower() for flag in value.split())
    flags = found & _INTERESTING
    if "asimd" in flags:
        flags.add("neon")  # aarch64 spells NEON "asimd"
    return sorted(flags)


def is_jetson(release_file: Path = Path("/etc/nv_tegra_release")) -> bool:
    """Return True on an NVIDIA Jetson (L4T writes /etc/nv_tegra_release)."""
    return release_file.exists()


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """Return the physical cores this process may run on (its CPU affinity), logical CPUs when unknown.

    Hyper-threads of one core share it: counting each core once gives ONNX Runtime's
    threads one core each. A container's cpuset shows in the affinity mask.
    """
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in usable:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                cores.add((topology / name).read_text().strip())
                break
            except OSError:
                continue
        else:
            return max(1, len(usable))  # no topology (some containers, non-Linux): logical CPUs
    return max(1, len(cores))


def memory_mb() -> int:
    """Return the machine's physical memory in MB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def ort_providers() -> list[str]:
    """Return the execution providers this onnxruntime build offers."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return ["CPUExecutionProvider"]


def cuda_devices() -> list[str]:
    """Return the names of visible NVIDIA GPUs (via nvidia-smi), empty when none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed: %s", exc)
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect_profile(
    state_dir: Path | None = None,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    tegra_release: Path = Path("/etc/nv_tegra_release"),
) -> DeviceProfile:
    """Detect this machine's profile."""
    disk_root = state_dir if state_dir is not None and state_dir.exists() else Path("/")
    return DeviceProfile(
        arch=platform.machine() or "unknown",
        os=f"{platform.system().lower()} {platform.release()}"[:64],
        cpu_flags=cpu_flags(cpuinfo),
        cores=physical_cores(),
        memory_mb=memory_mb(),
        disk_free_mb=shutil.disk_usage(disk_root).free // (1024 * 1024),
        providers=ort_providers(),
        cuda_devices=cuda_devices(),
        jetson=is_jetson(tegra_release),
    )
