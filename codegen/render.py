"""Render a Variant into its CUDA translation unit (Jinja2, StrictUndefined).

Jinja renders only the variant's configuration struct, the explicit instantiation of the kernel templates
and the C-ABI entry points (templates/variant.cu.j2); the kernel bodies are real C++ headers under
templates/kernels/, templated on that struct.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jinja2

from .variant import QREGS, TILE_TMAS, Variant


def templates_dir() -> Path:
    return Path(str(resources.files("flash_mla.templates")))


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


_CUTE_TYPES = {"bf16": "cutlass::bfloat16_t", "fp16": "cutlass::half_t", "e4m3": "cutlass::float_e4m3_t"}


def template_context(v: Variant) -> dict:
    v.validate()
    return {
        **v.as_dict(),
        "key": v.build_key,
        "ns": f"fmla_{v.build_key}",
        "knobs": v.compile_knobs(),
        "cute_type": _CUTE_TYPES[v.q_dtype],
        "kv_cute_type": _CUTE_TYPES[v.kv_dtype],
        "qk_enum": {"nsplit": "kNsplit", "full_wg": "kFullWg", "full_wg_ahead": "kFullWgAhead", "swap16": "kSwap",
                    "swap32": "kSwap", "qreg": "kQreg", "qreg_ahead": "kQregAhead"}[v.qk],
        "rows_n": v.rows_per_cta,
        "widen_ahead": "true" if v.widen == "ahead" else "false",
        "tma_tile": "true" if v.tma in TILE_TMAS else "false",
        "tile_parts": v.tile_parts,
        "pv_regs": "true" if v.pv == "regs" else "false",
        "release_early": "true" if v.release == "early" else "false",
        "pv_behind_qk": "true" if v.wg1_pv == "with_softmax" else "false",
        "producer_wg": "true" if v.producer == "warpgroup" else "false",
        "merge_enum": {"separate": "kSeparate", "wide_pdl": "kWidePdl"}[v.merge],
        # a trace build's stamps (templates/kernels/trace.cuh): qreg phases, or the nsplit start-up timeline
        "trace_macro": "FMLA_TRACE" if v.qk in QREGS else "FMLA_TIMELINE",
    }


def render(v: Variant) -> str:
    """CUDA source of the variant (decode kernel, combine kernel and C-ABI launcher)."""
    return _env().get_template("variant.cu.j2").render(**template_context(v))


@functools.lru_cache(maxsize=1)
def _static_headers() -> tuple:
    root = templates_dir()
    return tuple(sorted((f"kernels/{p.name}", p.read_text()) for p in (root / "kernels").iterdir()
                        if p.suffix in (".h", ".cuh")))


@functools.lru_cache(maxsize=1)
def kernel_source_digest() -> str:
    """Short hash of every kernel source (the variant template and the kernel headers): timings taken with
    one kernel source are never reused for another (the tuner's study names carry it)."""
    import hashlib
    h = hashlib.sha256((templates_dir() / "variant.cu.j2").read_bytes())
    for name, text in _static_headers():
        h.update(b"\0" + name.encode() + b"\0" + text.encode())
    return h.hexdigest()[:10]


def static_headers() -> dict[str, str]:
    """The kernel headers (templates/kernels/: bodies, constants, the C ABI) the rendered source includes,
    by path relative to the variant's build folder."""
    return dict(_static_headers())
