"""Workloads the tuner optimises for, and the named suites (DeepSeek-V3 decode shapes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flash_mla.db import bucket_batch, bucket_seqlen

from .measure import Shape


@dataclass(frozen=True)
class Workload:
    """One tuning target: the DB key fields plus the representative batch and mean length measured."""
    h_q: int
    s_q: int
    batch: int
    mean_sk: int
    h_kv: int = 1
    causal: bool = False
    dtype: str = "bf16"
    page_size: int = 64

    @property
    def key(self) -> str:
        return (f"{self.dtype}_p{self.page_size}_hq{self.h_q}_hkv{self.h_kv}_sq{self.s_q}"
                f"{'_causal' if self.causal else ''}_b{bucket_batch(self.batch)}_sk{bucket_seqlen(self.mean_sk)}")

    @property
    def shape(self) -> Shape:
        return Shape(self.batch, self.s_q, self.h_q, self.mean_sk, self.h_kv, self.causal)

    def db_fields(self) -> dict:
        """The workload part of the tuning-DB key (flash_mla.db)."""
        return {"dtype": self.dtype, "h_q": self.h_q, "h_kv": self.h_kv, "s_q": self.s_q, "head_dim": 576,
                "head_dim_v": 512, "page_size": self.page_size, "causal": int(self.causal),
                "batch_bucket": bucket_batch(self.batch), "seqlen_bucket": bucket_seqlen(self.mean_sk)}

    def as_dict(self) -> dict:
        return asdict(self)


BATCHES = (4, 32, 128)
SEQLENS = (2048, 8192)

SUITES = {
    # DeepSeek-V3 decode without tensor parallelism: all 128 heads on one GPU
    "dsv3-tp1": [Workload(128, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    # with TP8: 16 heads per GPU
    "dsv3-tp8": [Workload(16, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    # multi-token prediction: two query tokens, causal
    "dsv3-mtp": [Workload(128, 2, b, sk, causal=True) for b in BATCHES for sk in SEQLENS],
    # small batches (latency-bound): TP8, TP4 and TP1 head counts at one and eight requests
    "dsv3-small": [Workload(h, 1, b, sk) for h in (16, 32, 128) for b in (1, 8) for sk in SEQLENS],
}


def suite(name: str) -> list[Workload]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
