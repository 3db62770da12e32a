"""Correctness gate: run a built variant over the FlashMLA correctness matrix against the reference.

Every case draws fresh random inputs, NaN-poisons unused pages and the tail of each last page, and
NaN-poisons the output buffers before the launch, so unwritten outputs and out-of-sequence reads fail.
A variant must pass here before it may be timed, stored or selected.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

import torch

from flash_mla import runtime
from flash_mla.codegen.variant import Variant
from flash_mla.reference import mla_decode_reference
from flash_mla.testing import varlen_seqlens

from .measure import SCALE, Problem, Shape, check, make_typed_inputs


@dataclass(frozen=True)
class Case:
    b: int
    s_q: int
    h_q: int
    h_kv: int
    s_k: int
    varlen: bool
    causal: bool
    zero_len: bool = False      # force some requests to length 0

    @property
    def name(self) -> str:
        return (f"b{self.b}_sq{self.s_q}_hq{self.h_q}_hkv{self.h_kv}_sk{self.s_k}"
                f"{'_var' if self.varlen else ''}{'_causal' if self.causal else ''}{'_zero' if self.zero_len else ''}")


# ANCHORS.md: FlashMLA's correctness matrix.
MATRIX = dict(b=(1, 2, 6, 64), s_q=(1, 2, 4), s_k=(20, 140, 4096), h_q=(1, 3, 9, 63, 64, 126, 128),
              h_kv=(1, 2, 3, 8), varlen=(False, True), causal=(False, True))


def full_matrix() -> list[Case]:
    cases = []
    for b, s_q, s_k, h_q, h_kv, varlen, causal in itertools.product(*MATRIX.values()):
        if h_q % h_kv == 0:
            cases.append(Case(b, s_q, h_q, h_kv, s_k, varlen, causal))
    cases += [Case(b, s_q, 64, 1, 140, True, True, zero_len=True) for b in (2, 6) for s_q in (1, 2)]
    cases += [Case(1, 1, 16, 1, 0, False, False, zero_len=True)]
    return cases


def sampled_matrix(n: int = 48, seed: int = 0) -> list[Case]:
    """A seeded sample of the full matrix that still covers every value of every dimension."""
    cases = full_matrix()
    rng = random.Random(seed)
    picked = set()
    for dim, values in MATRIX.items():
        for v in values:
            pool = [c for c in cases if getattr(c, dim) == v and not c.zero_len]
            picked.add(rng.choice(pool))
    picked.update(c for c in cases if c.zero_len)
    rest = [c for c in cases if c not in picked]
    picked.update(rng.sample(rest, max(0, n - len(picked))))
    return sorted(picked, key=lambda c: c.name)


def make_inputs(case: Case, dtype: str, page_size: int, seed: int, device="cuda"):
    """``(q, k_cache, block_table, cache_seqlens, k_scale)`` of a case for a variant dtype name."""
    g = torch.Generator(device=device).manual_seed(seed)
    if case.varlen:
        lens = varlen_seqlens(case.b, case.s_k, case.s_q, g)
    else:
        lens = [case.s_k] * case.b
    if case.zero_len:
        lens = [0 if i % 2 == 0 else x for i, x in enumerate(lens)]
    return make_typed_inputs(dtype, case.b, case.s_q, case.h_q, case.h_kv, lens, page_size, device, g)


def run_case(variant: Variant, case: Case, seed: int) -> dict:
    q, k, bt, sl, k_scale = make_inputs(case, variant.dtype, variant.page_size, seed)
    lens = [int(x) for x in sl.tolist()]
    shape = Shape(case.b, case.s_q, case.h_q, case.s_k, case.h_kv, case.causal, case.varlen)
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, 512, SCALE, case.causal, k_scale=k_scale)
    problem = Problem(shape, variant.dtype, variant.page_size, lens, q, k, bt, sl, ref_out, ref_lse, k_scale)
    verdict, _ = check(variant, problem)
    return {"case": case.name, **asdict(case), "seed": seed, **verdict}


def check_variant(variant: Variant, cases: list[Case], seed: int = 0) -> list[dict]:
    rows = []
    for i, case in enumerate(cases):
        try:
            rows.append(run_case(variant, case, seed * 100003 + i))
        except runtime.KernelLaunchError as e:
            rows.append({"case": case.name, "ok": False, "error": str(e)})
    return rows
