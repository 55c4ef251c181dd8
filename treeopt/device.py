"""Device facts, read once: CPU name and flags, NVIDIA GPU facts via pynvml, the file-name
id of the local device (its identity: what changes t(L)), and the one synchronize helper.

Two machines share an identity only where a forward costs alike on both: for a CPU its
name, its instruction-set class (:func:`cpu_isa`: AMX, AVX-512 with bf16, AVX-512, AVX2,
Arm SVE or NEON) and its core count — CPUs sold under one name differ in the first two;
for a GPU its name and memory. ``$TREEOPT_DEVICE_ID`` overrides it (to use another
machine's artefacts as this one's, and in tests, to pin one identity on any machine)."""
from __future__ import annotations

import functools
import os
import pathlib
import platform
import resource

from .errors import BadInput
from .paths import slug


# Arm CPUs name themselves by implementer and part number in /proc/cpuinfo (no "model
# name"): the ones servers use (Arm's Neoverse and Cortex parts, Ampere's own cores)
ARM_IMPLEMENTERS = {0x41: "ARM", 0xc0: "Ampere", 0x61: "Apple", 0x48: "HiSilicon",
                    0x4e: "NVIDIA", 0x51: "Qualcomm"}
ARM_PARTS = {(0x41, 0xd08): "Cortex-A72", (0x41, 0xd0b): "Cortex-A76",
             (0x41, 0xd0c): "Neoverse-N1", (0x41, 0xd40): "Neoverse-V1",
             (0x41, 0xd49): "Neoverse-N2", (0x41, 0xd4f): "Neoverse-V2",
             (0x41, 0xd84): "Neoverse-V3", (0x41, 0xd8e): "Neoverse-N3",
             (0xc0, 0xac3): "AmpereOne", (0xc0, 0xac4): "AmpereOne-A"}


def parse_cpuinfo(text: str) -> tuple[str, frozenset]:
    """(CPU name, flags) of /proc/cpuinfo text: x86 gives "model name" and "flags"; arm64
    gives "Features" and, instead of a name, "CPU implementer" and "CPU part" (named from
    :data:`ARM_PARTS`, else by their numbers). ("", …) when it names none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    name = fields.get("model name", "")
    if not name and "CPU implementer" in fields:
        try:
            imp, part = int(fields["CPU implementer"], 16), int(fields.get("CPU part", "0"), 16)
        except ValueError:
            return "", flags
        name = f"{ARM_IMPLEMENTERS.get(imp, f'Arm implementer {imp:#x}')} " + \
            ARM_PARTS.get((imp, part), f"part {part:#x}")
        name = name.replace("ARM Neoverse", "Arm Neoverse").replace("ARM Cortex", "Arm Cortex")
    return name, flags


@functools.lru_cache(maxsize=1)
def cpuinfo() -> tuple[str, frozenset]:
    """(CPU name, flags) of this machine, parsed once (:func:`parse_cpuinfo`)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name, flags = parse_cpuinfo(text)
    return name or platform.processor() or platform.machine(), flags


def cpu_name() -> str:
    return cpuinfo()[0]


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    flags = cpuinfo()[1]
    if not flags:
        return platform.machine() == "arm64"  # Apple silicon has bf16
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_isa(flags: frozenset | None = None, machine: str | None = None) -> str:
    """The instruction-set class that sets a CPU forward's cost: ``amx``, ``avx512bf16``,
    ``avx512``, ``avx2``, ``sve``, ``neon`` or ``base`` (the best the flags show)."""
    flags = cpuinfo()[1] if flags is None else flags
    machine = platform.machine() if machine is None else machine
    for isa, needs in (("amx", {"amx_bf16", "amx_tile"}), ("avx512bf16", {"avx512_bf16"}),
                       ("avx512", {"avx512f"}), ("avx2", {"avx2"}), ("sve", {"sve"}),
                       ("neon", {"asimd", "neon"})):
        if needs & flags:
            return isa
    return "neon" if machine in ("arm64", "aarch64") else "base"


def cpu_facts(threads: int) -> dict:
    flags = cpuinfo()[1]
    return {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "bf16": cpu_has_bf16(), "avx512": "avx512f" in flags,
            "amx": bool({"amx_bf16", "amx_tile"} & flags), "isa": cpu_isa(),
            "machine": platform.machine()}


def cpu_id(name: str, isa: str, cores: int | None) -> str:
    """A CPU's identity: ``cpu-<name>-<isa>-<cores>c``."""
    return f"cpu-{slug(name)}-{isa}-{cores}c"


X86_ISAS, ARM_ISAS = ("amx", "avx512bf16", "avx512", "avx2"), ("sve", "neon")


def cpu_class(device_id: str) -> tuple[str, str, int] | None:
    """(architecture, ISA class, cores) read back from a CPU identity
    ``cpu-<name>-<isa>-<cores>c``: trees searched on one CPU of a class (x86 or Arm) are
    the nearest a first run on another of that class has; None for a GPU or a pinned id
    that says no class."""
    *_, isa, cores = device_id.split("-") if device_id.startswith("cpu-") else ("", "")
    if not (cores.endswith("c") and cores[:-1].isdigit()):
        return None
    arch = "x86" if isa in X86_ISAS else "arm" if isa in ARM_ISAS else None
    return (arch, isa, int(cores[:-1])) if arch else None


def device_slug(device: str = "cpu") -> str:
    """File-name id of the local device (see the module's docstring): ``$TREEOPT_DEVICE_ID``,
    else ``cpu-<model>-<isa>-<cores>c``, else ``<gpu name>-<memory>gb``."""
    pinned = os.environ.get("TREEOPT_DEVICE_ID", "").strip()
    if pinned:
        return slug(pinned)
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{slug(props.name)}-{round(props.total_memory / 2**30)}gb"
    return cpu_id(cpu_name(), cpu_isa(), os.cpu_count())


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def peak_memory(device) -> dict:
    """The process's peak memory so far: on a GPU `torch.cuda.max_memory_allocated` (the
    tensors torch held at most), elsewhere the peak resident set (ru_maxrss: weights,
    runtime, caches, activations) — what a user must have free to run it."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        return {"bytes": int(torch.cuda.max_memory_allocated(device)),
                "measure": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": int(rss) * (1 if platform.system() == "Darwin" else 1024),
            "measure": "peak RSS"}


def gpu_check() -> None:
    """Exit-2 reasons when a GPU profile cannot work here: pynvml or CUDA unavailable."""
    try:
        import pynvml
    except ImportError as e:
        raise BadInput("--gpu: pynvml unavailable (install nvidia-ml-py)") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise BadInput(f"--gpu: pynvml cannot reach an NVIDIA driver ({e})") from e
    import torch

    if not torch.cuda.is_available():
        raise BadInput(f"--gpu: CUDA unavailable in torch {torch.__version__} "
                       f"(CUDA build: {torch.version.cuda or 'none'})")


def _safe(f, *a):
    try:
        v = f(*a)
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - not every field exists on every GPU
        return None


def gpu_facts() -> dict:
    import pynvml
    import torch

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    mem = _safe(pynvml.nvmlDeviceGetMemoryInfo, h)
    return {"kind": "cuda", "name": _safe(pynvml.nvmlDeviceGetName, h),
            "memory_bytes": mem.total if mem else None,
            "driver": _safe(pynvml.nvmlSystemGetDriverVersion),
            "cuda": torch.version.cuda, "torch": torch.__version__,
            "power_limit_w": (_safe(pynvml.nvmlDeviceGetPowerManagementLimit, h) or 0) / 1000,
            **gpu_clocks(h)}


def gpu_clocks(handle=None) -> dict:
    import pynvml
    import torch

    if handle is None:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    return {"sm_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, handle,
                                   pynvml.NVML_CLOCK_MEM),
            "temperature_c": _safe(pynvml.nvmlDeviceGetTemperature, handle,
                                   pynvml.NVML_TEMPERATURE_GPU)}
