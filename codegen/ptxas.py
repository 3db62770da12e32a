"""Parse the ptxas resource report (``-Xptxas -v``) of a build into per-kernel figures."""

from __future__ import annotations

import re
from dataclasses import dataclass

_FUNC = re.compile(r"ptxas info\s*: (?:Compiling entry function|Function properties for) '([^']+)'")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def short_name(mangled: str) -> str:
    for k in ("decode_kernel", "combine_kernel"):
        if k in mangled:
            return k
    return mangled


def parse(report: str) -> dict[str, KernelResources]:
    """Kernel short name -> resources. Lines for one function come as: entry, properties, spills, used."""
    out: dict[str, KernelResources] = {}
    current = None
    spill = (0, 0, 0)
    for line in report.splitlines():
        m = _FUNC.search(line)
        if m:
            if current != m.group(1):
                spill = (0, 0, 0)
            current = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and current:
            spill = tuple(int(x) for x in m.groups())
            continue
        m = _USED.search(line)
        if m and current:
            name = short_name(current)
            out[name] = KernelResources(
                name=name, registers=int(m.group(1)), stack_frame=spill[0], spill_stores=spill[1],
                spill_loads=spill[2], static_smem=int(m.group(3) or 0))
            current, spill = None, (0, 0, 0)
    return out


_SERIALISED = re.compile(r"\((C75\d\d)\) Potential Performance Loss: (wgmma[^']*?) (?:in|for) the function")


def serialised_wgmma(report: str) -> list[str]:
    """ptxas's "wgmma ... serialized" notes (code and reason): each one means that every wgmma of the kernel
    waits for the previous one, which removes the overlap the pipeline is built for."""
    return [f"{m.group(1)}: {m.group(2).strip()}" for m in _SERIALISED.finditer(report)]
