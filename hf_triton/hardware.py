"""What this machine offers the model's arithmetic: the CPU's vector features, or a GPU.

The same cloud machine type comes with AVX2 only, with AVX-512 (+ BF16 + VNNI), or with AMX,
and the fastest variant differs on each (bf16 without native support is ~8x slower than
fp32; int8 without VNNI gains little). Every figure this project reports names the kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    flags: frozenset[str] = field(default_factory=frozenset)
    gpu: str | None = None  # the first CUDA device's name

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bfloat16 dot products (AVX512-BF16 or AMX-BF16)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def vnni(self) -> bool:
        """int8 dot products in one instruction (AVX512-VNNI or AVX-VNNI)."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def kind(self) -> str:
        """AMX, "AVX-512 + BF16 + VNNI" (whichever of the two it has), AVX2, or older."""
        if self.amx:
            return "AMX"
        if self.avx512:
            extras = [n for n, has in (("BF16", self.bf16), ("VNNI", self.vnni)) if has]
            return " + ".join(["AVX-512", *extras])
        if self.avx2:
            return "AVX2 + VNNI" if self.vnni else "AVX2"
        return "no AVX2"

    def describe(self) -> str:
        gpu = f"; GPU: {self.gpu}" if self.gpu else "; no GPU"
        return f"{self.cpu or 'unknown CPU'}, {self.cores} cores, {self.kind}{gpu}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The model name and the feature flags of the first processor in ``/proc/cpuinfo``."""
    cpu, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not cpu:
            cpu = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return cpu, flags


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def detect() -> Machine:
    try:
        cpu, flags = parse_cpuinfo(CPUINFO.read_text())
    except OSError:  # not Linux: features unknown, measured anyway
        cpu, flags = "", frozenset()
    return Machine(cpu, os.cpu_count() or 1, flags, _gpu())
