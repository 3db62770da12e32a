"""One workload key from tuner to dispatch: a tuned workload's own call selects its own winner (CPU only)."""

from __future__ import annotations

import math

import pytest

from flash_mla import db, dispatch, selection
from flash_mla.codegen.variant import Variant, default_variant
from flash_mla.testing import varlen_seqlens
from flash_mla.tuner import tune
from flash_mla.tuner.workloads import SUITES, Workload
from flash_mla.workload_key import NO_HINT, WorkloadKey, bucket_seqlen, mean_seqlen_hint

GPU, SMS, CUDA = "NVIDIA H100 80GB HBM3", 132, "13.0"
HW = {"gpu_name": GPU, "sm_count": SMS, "cuda_version": CUDA, "hostname": "test"}


def test_key_fields_and_canonical_form():
    k = WorkloadKey.for_call(dtype="bf16", h_q=128, h_kv=1, s_q=2, page_size=64, causal=True, batch=20,
                             mean_seqlen=3000.5)
    assert (k.batch_bucket, k.seqlen_bucket) == (32, 4096)
    assert k.canonical == "bf16_p64_hq128_hkv1_sq2_causal_b32_sk4096"
    assert k.without_hint().canonical == "bf16_p64_hq128_hkv1_sq2_causal_b32_sknohint"
    assert not k.without_hint().has_hint and k.has_hint
    assert WorkloadKey.from_row({**k.db_fields()}) == k
    # one query row: the causal flag changes nothing and is not part of the key
    one = WorkloadKey.for_call(dtype="bf16", h_q=16, h_kv=1, s_q=1, page_size=64, causal=True, batch=1)
    assert not one.causal and one.seqlen_bucket == NO_HINT
    with pytest.raises(ValueError, match="multiple of h_kv"):
        WorkloadKey("bf16", 10, 4, 1, 64, False, 1, 64)
    with pytest.raises(ValueError, match="seqlen_bucket"):
        WorkloadKey("bf16", 16, 1, 1, 64, False, 1, 3)


def test_every_suite_workload_keys_like_its_call():
    for ws in SUITES.values():
        for w in ws:
            call = WorkloadKey.for_call(dtype=w.dtype, h_q=w.h_q, h_kv=w.h_kv, s_q=w.s_q, page_size=w.page_size,
                                        causal=w.causal, batch=w.batch, mean_seqlen=w.mean_sk)
            assert w.workload_key == call and w.key == call.canonical
            assert {k: w.db_fields()[k] for k in ("batch_bucket", "seqlen_bucket")} == \
                {"batch_bucket": call.batch_bucket, "seqlen_bucket": call.seqlen_bucket}


def test_length_hint_forms():
    torch = pytest.importorskip("torch")
    assert mean_seqlen_hint(None) is None
    assert mean_seqlen_hint(1000) == 1000.0
    assert mean_seqlen_hint([1000, 3000]) == 2000.0
    assert mean_seqlen_hint(torch.tensor([10, 20, 30], dtype=torch.int32)) == 20.0
    for bad, exc in ((-1, ValueError), ([], ValueError), (float("nan"), ValueError), (True, TypeError),
                     ("2048", TypeError), ([5, -2], ValueError)):
        with pytest.raises(exc, match="seqlens_hint"):
            mean_seqlen_hint(bad)
    with pytest.raises(ValueError, match="synchronise"):
        mean_seqlen_hint(torch.zeros(3, device="meta"))


class LengthAwareMeasurer:
    """Synthetic times where the best block size depends on the length (so winners differ per workload)."""

    def __init__(self):
        self.calls = []

    def measure(self, variant, shape, seed=0):
        v = Variant.from_dict(variant)
        self.calls.append((v.key, shape["mean_sk"]))
        us = 100.0 + 3 * abs(v.stages - 2) + 5 * (v.num_warpgroups - 2) + 0.5 * v.split_overhead \
            + (0.0 if v.merge == "wide_pdl" else 2.0) + {"nsplit": 1.0, "full_wg": 0.5, "full_wg_ahead": 1.5, "swap16": 2.5, "swap32": 3.0, "qreg": 2.0}[v.qk]
        if v.block_n == 32:
            us += -6.0 if shape["mean_sk"] <= 2048 else 9.0
        return {"state": "ok", "us": us * shape["mean_sk"] / 1024, "gbs": 1.0, "tflops": 1.0}

    def stop(self):
        pass


def _tuned_db(tmp_path, workloads, stored_rows=(), db_name="tuned.sqlite"):
    """A DB as `flash-mla tune` leaves it: each workload's exhaustive winner, then the no-hint winners."""
    m = LengthAwareMeasurer()
    tdb = db.TuningDB(tmp_path / db_name)
    run_id = tdb.add_run(HW)
    results = []
    for w in workloads:
        name = tune.study_name(GPU, w)
        times = {}
        for v in tune.search_space(w.dtype, w.page_size):
            r = m.measure(v.as_dict(), {"mean_sk": w.mean_sk})
            tdb.add_trial(run_id, name, v, w.as_dict(), "ok", time_us=r["us"])
            times[v.key] = (r["us"], v)
        best_us, best_v = min(times.values(), key=lambda x: (x[0], x[1].key))
        res = tune.StudyResult(w, {"variant": best_v, "us": best_us, "trial_index": 0},
                               times[default_variant(w.dtype, w.page_size).key][0], [None] * len(times))
        tune.record(tdb, run_id, res, GPU)
        results.append(res)
    groups = tune.no_hint_winners(results, tdb, run_id, GPU, measurer=m, stored_rows=stored_rows)
    tdb.close()
    return tmp_path / db_name, results, groups


@pytest.fixture
def user_db(monkeypatch):
    monkeypatch.delenv(db.ENV_USER_DB, raising=False)
    monkeypatch.setattr(db, "shipped_db_path", lambda: None)
    monkeypatch.setattr(selection, "device_info", lambda index: (GPU, SMS, CUDA))
    yield
    db.set_user_db(None)


def test_tuned_workloads_own_calls_select_their_own_winners(tmp_path, user_db):
    torch = pytest.importorskip("torch")
    workloads = [Workload(16, 1, b, sk) for b in (4, 32) for sk in (2048, 8192)] + \
                [Workload(128, 2, 32, sk, causal=True) for sk in (2048, 8192)]
    path, results, groups = _tuned_db(tmp_path, workloads)
    assert {r.best["variant"].block_n for r in results if r.workload.mean_sk == 2048} == {32}
    assert {r.best["variant"].block_n for r in results if r.workload.mean_sk == 8192} == {64}
    db.set_user_db(path)
    g = torch.Generator().manual_seed(0)
    for res in results:
        w = res.workload
        # the call an engine makes: its block table is max_model_len / page wide whatever the lengths
        lens = varlen_seqlens(w.batch, w.mean_sk, w.s_q, g)
        q = torch.empty(w.batch, w.s_q, w.h_q, 576, dtype=torch.bfloat16, device="meta")
        k_cache = torch.empty(4096, w.page_size, w.h_kv, 576, dtype=torch.bfloat16, device="meta")
        block_table = torch.empty(w.batch, 2048, dtype=torch.int32, device="meta")
        assert block_table.shape[1] * w.page_size == 131072
        assert bucket_seqlen(sum(lens) / len(lens)) == w.workload_key.seqlen_bucket
        chosen = dispatch.select_variant(q, k_cache, w.causal, mean_seqlen_hint(torch.tensor(lens)))
        assert chosen == res.best["variant"], w.key
        # without a hint: the winner stored for its group of lengths
        group = next(x for x in groups if x["key"] == w.workload_key.without_hint())
        assert dispatch.select_variant(q, k_cache, w.causal) == group["variant"]


def test_no_hint_winner_is_the_best_geometric_mean_over_the_groups_lengths(tmp_path, user_db):
    workloads = [Workload(16, 1, 32, sk) for sk in (2048, 8192)]
    _, results, groups = _tuned_db(tmp_path, workloads)
    (g,) = groups
    assert g["key"].canonical == "bf16_p64_hq16_hkv1_sq1_b32_sknohint"
    m = LengthAwareMeasurer()
    dv = default_variant()
    cands = {r.best["variant"].key: r.best["variant"] for r in results} | {dv.key: dv}
    t = {(k, w.mean_sk): m.measure(v.as_dict(), {"mean_sk": w.mean_sk})["us"]
         for k, v in cands.items() for w in workloads}
    best = {w.mean_sk: min(t[(k, w.mean_sk)] for k in cands) for w in workloads}

    def score(k):
        return math.exp(sum(math.log(t[(k, w.mean_sk)] / best[w.mean_sk]) for w in workloads) / len(workloads))

    expect = min(cands, key=lambda k: (score(k), k != dv.key, k))
    assert g["variant"].key == expect and g["score"] == pytest.approx(score(expect))
    with db.TuningDB(tmp_path / "tuned.sqlite", readonly=True) as tdb:
        rows = tdb.winners(seqlen_bucket=NO_HINT)
    assert [r["variant_key"] for r in rows] == [expect]
    assert rows[0]["time_us"] == pytest.approx(math.sqrt(t[(expect, 2048)] * t[(expect, 8192)]))


def test_no_hint_winner_of_a_run_over_one_length_also_weighs_the_lengths_tuned_before(tmp_path, user_db):
    both = [Workload(16, 1, 32, sk) for sk in (2048, 8192)]
    _, _, (expect,) = _tuned_db(tmp_path, both, db_name="both.sqlite")
    first, _, _ = _tuned_db(tmp_path, both[1:], db_name="first.sqlite")            # an earlier run: s_k 8192 only
    with db.TuningDB(first, readonly=True) as f:
        stored = f.winners() + [{**r, "gpu_name": "Other GPU", "seqlen_bucket": 1024} for r in f.winners()]
    _, _, (g,) = _tuned_db(tmp_path, both[:1], stored_rows=stored, db_name="second.sqlite")   # now s_k 2048 only
    assert sorted(g["workloads"]) == sorted(w.key for w in both)          # the other GPU's row is not taken
    assert g["variant"] == expect["variant"] and g["score"] == pytest.approx(expect["score"])
    class FailsAt8192(LengthAwareMeasurer):
        def measure(self, variant, shape, seed=0):
            return {"state": "failed_check"} if shape["mean_sk"] == 8192 else super().measure(variant, shape, seed)
    tdb = db.TuningDB(tmp_path / "failing.sqlite")
    run_id = tdb.add_run(HW)
    res = tune.StudyResult(both[0], {"variant": expect["variant"], "us": 1.0, "trial_index": 0}, None, [])
    (g,) = tune.no_hint_winners([res], tdb, run_id, GPU, measurer=FailsAt8192(), stored_rows=stored)
    tdb.close()
    assert g["workloads"] == [both[0].key]                       # the stored length that failed here is left out
    _, _, (alone,) = _tuned_db(tmp_path, both[:1], db_name="alone.sqlite")
    assert alone["workloads"] == [both[0].key] and alone["variant"] != expect["variant"]


def test_runtime_key_of_tensors_equals_the_call_key():
    torch = pytest.importorskip("torch")
    for b, s_q, h_q, causal, mean in ((1, 1, 16, True, None), (20, 2, 128, True, 3000.5), (7, 4, 64, False, 90.0)):
        q = torch.empty(b, s_q, h_q, 576, dtype=torch.float16, device="meta")
        k = torch.empty(10, 32, 1, 576, dtype=torch.float16, device="meta")
        assert selection.key_for_tensors(q, k, causal, mean) == WorkloadKey.for_call(
            dtype="fp16", h_q=h_q, h_kv=1, s_q=s_q, page_size=32, causal=causal, batch=b, mean_seqlen=mean)
