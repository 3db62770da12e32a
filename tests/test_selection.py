"""Runtime variant selection from the tuning databases (CPU only)."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from flash_mla import db, selection
from flash_mla.codegen.variant import Variant
from flash_mla.workload_key import NO_HINT, WorkloadKey

GPU, SMS, CUDA = "NVIDIA H100 80GB HBM3", 132, "12.8"
SHAPE = {"dtype": "bf16", "h_q": 128, "h_kv": 1, "s_q": 1, "page_size": 64, "causal": False}


@pytest.fixture
def dbs(tmp_path, monkeypatch):
    """Isolated databases: ``dbs.shipped`` / ``dbs.user`` paths, neither existing until written."""
    class Paths:
        shipped = tmp_path / "shipped.sqlite"
        user = tmp_path / "user.sqlite"

    monkeypatch.delenv(db.ENV_USER_DB, raising=False)
    monkeypatch.setattr(db, "shipped_db_path", lambda: Paths.shipped if Paths.shipped.is_file() else None)
    db.set_user_db(Paths.user)
    yield Paths
    db.set_user_db(None)


def add_winner(path, batch_bucket, seqlen_bucket, variant=None, *, gpu=GPU, sms=SMS, cuda=CUDA,
               time_us=10.0, **shape):
    """Store ``variant`` as the winner of one key in the DB at ``path`` (created if needed)."""
    shape = {**SHAPE, **shape}
    variant = variant or Variant(dtype=shape["dtype"], page_size=shape["page_size"])
    with db.TuningDB(path) as tdb:
        rid = tdb.add_run({"gpu_name": gpu, "sm_count": sms, "cuda_version": cuda, "hostname": "h"})
        tid = tdb.add_trial(rid, "s", variant, {**shape, "batch_bucket": batch_bucket,
                                                "seqlen_bucket": seqlen_bucket}, "ok", time_us=time_us)
        assert tdb.record_winner(tid)
    selection.clear_cache()
    return variant


def sel(batch=64, seqlen=4096, *, gpu=GPU, sms=SMS, cuda=CUDA, **shape):
    """Selection for a call of ``batch`` requests whose mean KV length (the hint) is ``seqlen``; None: no hint."""
    key = WorkloadKey.for_call(**{**SHAPE, **shape}, batch=batch, mean_seqlen=seqlen)
    return selection.select(gpu, sms, cuda, key)


V = [Variant(block_n=32, stages=s, num_warpgroups=w) for s in (1, 2, 3, 4) for w in (2, 4)]


def test_exact_bucket_and_nearest_rule(dbs):
    add_winner(dbs.shipped, 1, 1024, V[0])
    add_winner(dbs.shipped, 64, 4096, V[1])
    add_winner(dbs.shipped, 64, 65536, V[2])
    add_winner(dbs.shipped, 8, 8192, V[3])
    got = sel(64, 4096)
    assert (got.source, got.variant) == ("shipped", V[1])
    assert "tuned for bf16_p64_hq128_hkv1_sq1_b64_sk4096" in got.reason
    assert sel(2, 1000).variant == V[0]              # (2, 1024): (1, 1024) is 1 away
    # (64, 16384) is 2 away from both (64, 4096) and (64, 65536): the larger seqlen bucket wins
    assert sel(64, 16384).variant == V[2]
    # (16, 8192): (8, 8192) is 1 away, (64, 4096) 3
    assert sel(16, 8192).variant == V[3]
    # the hint is bucketed: 5000 tokens -> 8192; (64, 8192) is 1 from (64, 4096), 3 from (64, 65536), 3 from (8, 8192)
    assert sel(50, 5000).variant == V[1]


def test_batch_tie_goes_to_larger_batch_bucket(dbs):
    add_winner(dbs.shipped, 16, 4096, V[0])
    add_winner(dbs.shipped, 64, 4096, V[1])
    assert sel(32, 4096).variant == V[1]


def test_equal_distance_prefers_the_call_s_own_batch_bucket(dbs):
    # (32, 4096) is 1 away from all four rows; the two of its own batch bucket are the candidates, and their tie
    # is decided by their trials, although the trials favour the b16 row's winner everywhere
    add_tuned(dbs.shipped, 16, 4096, V[0], {V[1]: 20.0, V[2]: 20.0})
    add_tuned(dbs.shipped, 64, 4096, V[3], {V[0]: 10.0, V[1]: 20.0, V[2]: 20.0})
    add_tuned(dbs.shipped, 32, 2048, V[1], {V[2]: 10.5, V[0]: 10.0})
    add_tuned(dbs.shipped, 32, 8192, V[2], {V[1]: 13.0, V[0]: 10.0})
    got = sel(32, 4096)
    assert got.variant == V[2]
    assert "2 rows equally near, decided by their trials on 2 workloads" in got.reason
    # the split policy comes from the same row
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 32, 4096) == V[2].split_policy


def add_tuned(path, batch_bucket, seqlen_bucket, winner, others, *, time_us=10.0, **shape):
    """One tuning run of a key: ``winner`` measured at ``time_us`` and stored as the winner, beside trials of the
    variants ``others`` ({variant: time_us}) in the same run."""
    shape = {**SHAPE, **shape}
    workload = {**shape, "batch_bucket": batch_bucket, "seqlen_bucket": seqlen_bucket}
    with db.TuningDB(path) as tdb:
        rid = tdb.add_run({"gpu_name": GPU, "sm_count": SMS, "cuda_version": CUDA, "hostname": "h"})
        for v, us in others.items():
            tdb.add_trial(rid, "s", v, workload, "ok", time_us=us)
        assert tdb.record_winner(tdb.add_trial(rid, "s", winner, workload, "ok", time_us=time_us))
    selection.clear_cache()


def test_tie_between_batch_buckets_decided_by_trials(dbs):
    # b1 and b4 are equally near a call of two requests; b4's winner (V[1]) is 2x slower at b1, b1's (V[0]) only
    # 5% slower at b4: V[0] is the safer choice, whatever the larger-bucket rule says
    add_tuned(dbs.shipped, 1, 4096, V[0], {V[1]: 20.0})
    add_tuned(dbs.shipped, 4, 4096, V[1], {V[0]: 10.5})
    got = sel(2, 4096)
    assert got.variant == V[0]
    assert "2 rows equally near, decided by their trials on 2 workloads" in got.reason
    # the split policy comes from the same row
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 2, 4096) == V[0].split_policy
    # a call nearer to one row is not affected
    assert sel(4, 4096).variant == V[1]


def test_tie_counts_the_no_hint_steps_trials_but_not_the_bucket_checks(dbs):
    # the b1 row's only trial of V[1] is the no-hint step's (at the workload's own lengths): it counts; the b4
    # row's only trial of V[0] is a bucket check's (at another length of the bucket): it does not
    for bb, winner, other, phase, other_us in ((1, V[0], V[1], "no_hint", 20.0), (4, V[1], V[0], "bucket", 10.5)):
        workload = {**SHAPE, "batch_bucket": bb, "seqlen_bucket": 4096}
        with db.TuningDB(dbs.shipped) as tdb:
            rid = tdb.add_run({"gpu_name": GPU, "sm_count": SMS, "cuda_version": CUDA, "hostname": "h"})
            tdb.add_trial(rid, "s", other, workload, "ok", time_us=other_us, phase=phase)
            assert tdb.record_winner(tdb.add_trial(rid, "s", winner, workload, "ok", time_us=10.0, phase="search"))
    selection.clear_cache()
    got = sel(2, 4096)
    assert got.variant == V[0]
    assert "decided by their trials on 1 workloads" in got.reason


def test_tie_without_a_workload_measuring_both_keeps_the_larger_bucket(dbs):
    add_tuned(dbs.shipped, 1, 4096, V[0], {V[2]: 20.0})             # V[1] never measured at b1,
    add_tuned(dbs.shipped, 4, 4096, V[1], {V[2]: 10.5})             # V[0] never at b4
    got = sel(2, 4096)
    assert got.variant == V[1] and "equally near" not in got.reason


def test_no_hint_tie_decided_by_the_tied_buckets_length_rows(dbs):
    add_tuned(dbs.shipped, 1, NO_HINT, V[0], {})
    add_tuned(dbs.shipped, 4, NO_HINT, V[1], {})
    add_tuned(dbs.shipped, 1, 2048, V[0], {V[1]: 15.0})
    add_tuned(dbs.shipped, 1, 8192, V[0], {V[1]: 13.0})
    add_tuned(dbs.shipped, 4, 2048, V[1], {V[0]: 10.2})
    add_tuned(dbs.shipped, 4, 2048, V[1], {V[0]: 10.2}, h_q=64)      # another shape: not a reference
    got = sel(2, None)
    assert got.variant == V[0]
    assert "decided by their trials on 3 workloads" in got.reason


def test_cuda_compared_as_major_minor(dbs):
    add_winner(dbs.shipped, 64, 4096, V[1], cuda="12.8")
    assert sel(cuda="12.8.1").source == "shipped"


@pytest.mark.parametrize("miss", [{"gpu": "NVIDIA H200"}, {"sms": 114}, {"cuda": "13.0"}, {"dtype": "fp16"},
                                  {"h_q": 64}, {"s_q": 2}, {"page_size": 32}, {"causal": True, "s_q": 2}])
def test_key_mismatch_gives_default_and_one_warning(dbs, miss, caplog):
    add_winner(dbs.shipped, 64, 4096, V[1])
    add_winner(dbs.user, 64, 4096, V[2])
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        results = [sel(b, cap, **miss) for b in (1, 64, 64, 3) for cap in (100, 4096, 100000)]
    assert all(r.source == "default" and r.variant is None for r in results)
    caught = [r for r in caplog.records if r.name == "flash_mla"]
    assert len(caught) == 1, [r.getMessage() for r in caught]
    assert caught[0].levelno == logging.WARNING
    text = caught[0].getMessage()
    assert miss.get("gpu", GPU) in text and f"CUDA {miss.get('cuda', CUDA)}" in text
    assert "flash-mla tune" in text and "default variant" in text
    assert "no tuning DB entry" in results[0].reason


def test_no_database_at_all(dbs, caplog):
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        got = sel()
    assert got.source == "default" and "flash-mla tune" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        assert sel(batch=3).source == "default"
    assert caplog.records == []                             # the second call stays silent
    assert not dbs.shipped.exists() and not dbs.user.exists()


def test_cpu_torch_without_gpu_identity_is_default(dbs, caplog):
    add_winner(dbs.shipped, 64, 4096, V[1])
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        assert sel(gpu=None, sms=None, cuda=None).source == "default"
    assert "default variant" in caplog.text


def test_user_db_beats_shipped(dbs):
    add_winner(dbs.shipped, 64, 4096, V[1])                     # exact bucket in the shipped DB
    add_winner(dbs.user, 1, 131072, V[2])                       # far bucket, same key, in the user DB
    got = sel(64, 4096)
    assert (got.source, got.variant) == ("user", V[2])
    assert str(dbs.user) in got.reason
    # another key: the user DB has no row for it, the shipped one does
    add_winner(dbs.shipped, 64, 4096, V[3], causal=True, s_q=2)
    got = sel(64, 4096, causal=True, s_q=2)
    assert (got.source, got.variant) == ("shipped", V[3])


def test_env_var_names_user_db(dbs, monkeypatch, caplog):
    add_winner(dbs.user, 64, 4096, V[4])
    db.set_user_db(None)
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        assert sel().source == "default"                         # no user DB configured
    assert "default variant" in caplog.text
    monkeypatch.setenv(db.ENV_USER_DB, str(dbs.user))
    selection.clear_cache()
    assert sel().source == "user"


def test_cache_hits_do_not_query(dbs, monkeypatch):
    add_winner(dbs.shipped, 64, 4096, V[1])
    calls = []
    real = selection._matching_rows
    monkeypatch.setattr(selection, "_matching_rows", lambda *a: calls.append(a) or real(*a))
    first = sel(64, 4096)
    n = len(calls)
    assert n >= 1
    for batch, cap in ((64, 4096), (33, 3000), (60, 5700)):     # same buckets: (64, 4096)
        assert sel(batch, cap) is first
    assert len(calls) == n
    sel(65, 4096)                                                # a new bucket is looked up once
    assert len(calls) > n
    m = len(calls)
    sel(100, 4096)
    assert len(calls) == m
    db.set_user_db(dbs.user)                                     # clears the cache
    assert sel(64, 4096) == first and len(calls) > m


def test_database_handles_opened_once(dbs, monkeypatch):
    add_winner(dbs.shipped, 64, 4096, V[1])
    opened = []
    real = db.TuningDB.__init__

    def counting(self, path, **kw):
        opened.append(path)
        real(self, path, **kw)

    monkeypatch.setattr(db.TuningDB, "__init__", counting)
    for b in (1, 2, 4, 8, 16):
        sel(b, 4096)
        selection.split_policy(GPU, SMS, CUDA, 128, 1, b)
    assert opened == [dbs.shipped]                               # user DB absent: nothing to open


def test_newer_user_db_raises(dbs):
    add_winner(dbs.user, 64, 4096, V[1])
    con = sqlite3.connect(dbs.user)
    con.execute("update meta set value = ? where key = 'schema_version'", (str(db.SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    selection.clear_cache()
    with pytest.raises(db.SchemaVersionError):
        sel()


def test_unusable_variant_rows_are_ignored(dbs):
    # a row written by a newer package (unknown knob) or an invalid knob set cannot be launched here
    with db.TuningDB(dbs.user) as tdb:
        rid = tdb.add_run({"gpu_name": GPU, "sm_count": SMS, "cuda_version": CUDA})
        tid = tdb.add_trial(rid, "s", {**Variant().as_dict(), "new_knob": 3},
                            {**SHAPE, "batch": 64, "capacity_tokens": 4096}, "ok", time_us=1.0)
        tdb.record_winner(tid)
    add_winner(dbs.shipped, 64, 4096, V[1])
    assert sel().source == "shipped"


def test_split_policy(dbs, monkeypatch):
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) is None           # no DB
    add_winner(dbs.shipped, 64, 4096, Variant(dtype="fp16", split_overhead=7), dtype="fp16")
    add_winner(dbs.shipped, 64, 4096, Variant(page_size=32, split_overhead=9), page_size=32)
    selection.clear_cache()
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) == (9, 1)              # bf16 before page size
    add_winner(dbs.shipped, 64, 4096, Variant(split_overhead=2))
    add_winner(dbs.shipped, 1, 4096, Variant(split_overhead=5, block_n=32))
    add_winner(dbs.shipped, 8, 4096, Variant(split_overhead=3, block_n=32), h_q=16)   # other head count
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) == (2, 1)              # bf16, page 64, batch 64
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 100) == (2, 1)
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 2) == (5, 1)               # nearest batch bucket: 1
    assert selection.split_policy(GPU, SMS, CUDA, 16, 1, 8) == (3, 1)
    # h_q * s_q / h_kv: MTP with s_q = 2, h_q = 64 shares the 128-row head group
    add_winner(dbs.shipped, 512, 4096, Variant(split_overhead=4, block_n=32), h_q=64, s_q=2)
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 512) == (4, 1)
    assert selection.split_policy(GPU, SMS, CUDA, 128, 2, 64) is None           # h_kv differs
    assert selection.split_policy("NVIDIA H200", SMS, CUDA, 128, 1, 64) is None
    assert selection.split_policy(GPU, SMS, "13.0", 128, 1, 64) is None
    # user rows win here too
    add_winner(dbs.user, 1, 64, Variant(split_overhead=6, block_n=32, stages=3))
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) == (6, 1)
    # both knobs come from the one row (rows stored before split_min_blocks existed read as 1)
    add_winner(dbs.user, 1, 64, Variant(split_overhead=2, split_min_blocks=16, block_n=32, stages=3), time_us=5.0)
    selection.clear_cache()
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) == (2, 16)
    # cached per bucket
    calls = []
    real = selection._matching_rows
    monkeypatch.setattr(selection, "_matching_rows", lambda *a: calls.append(a) or real(*a))
    selection.split_policy(GPU, SMS, CUDA, 128, 1, 64)
    selection.split_policy(GPU, SMS, CUDA, 128, 1, 40)
    assert calls == []


def test_select_for_tensors_reads_shapes_and_the_hint_only(dbs, monkeypatch):
    torch = pytest.importorskip("torch")
    add_winner(dbs.shipped, 8, 2048, V[5])
    add_winner(dbs.shipped, 8, NO_HINT, V[6])
    monkeypatch.setattr(selection, "device_info", lambda index: (GPU, SMS, CUDA))
    q = torch.empty(8, 1, 128, 576, dtype=torch.bfloat16, device="meta")
    k = torch.empty(100, 64, 1, 576, dtype=torch.bfloat16, device="meta")
    got = selection.select_for_tensors(q, k, causal=False, mean_seqlen=1900.0)
    assert (got.source, got.variant) == ("shipped", V[5])
    got = selection.select_for_tensors(q, k, causal=False)
    assert (got.source, got.variant) == ("shipped", V[6])


def test_rows_with_and_without_a_hint_never_mix(dbs):
    add_winner(dbs.shipped, 64, 4096, V[1])
    add_winner(dbs.shipped, 64, NO_HINT, V[2])
    add_winner(dbs.shipped, 8, NO_HINT, V[3])
    assert sel(64, 4096).variant == V[1]
    assert sel(64, 131072).variant == V[1]               # far length: still a hinted row
    assert sel(64, None).variant == V[2]
    assert sel(16, None).variant == V[3]                 # nearest batch bucket (8 is 1, 64 is 2)
    assert sel(32, None).variant == V[2]                 # tie (8 and 128 would be...): 64 is 1, 8 is 2
    assert "tuned for bf16_p64_hq128_hkv1_sq1_b64_sknohint" in sel(64, None).reason


def test_no_hint_without_its_rows_is_the_default_and_says_how_to_pass_one(dbs, caplog):
    add_winner(dbs.shipped, 64, 4096, V[1])
    with caplog.at_level(logging.WARNING, logger="flash_mla"):
        got = sel(64, None)
    assert "seqlens_hint" in caplog.text
    assert got.source == "default" and "without a length hint" in got.reason
    assert sel(64, 4096).variant == V[1]


def test_split_policy_prefers_rows_of_the_calls_kind(dbs):
    add_winner(dbs.shipped, 64, 4096, Variant(split_overhead=2))
    add_winner(dbs.shipped, 64, NO_HINT, Variant(split_overhead=5, block_n=32))
    add_winner(dbs.shipped, 64, 32768, Variant(split_overhead=7, block_n=32, stages=3))
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64) == (5, 1)                 # no hint
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64, 4096) == (2, 1)
    assert selection.split_policy(GPU, SMS, CUDA, 128, 1, 64, 16384) == (7, 1)          # nearest seqlen bucket


def test_every_shipped_row_is_what_its_own_key_selects(monkeypatch):
    """Each winner row of the shipped database is the selection for its own workload key on its own GPU, so no
    merge can hide a tuned row behind another (the real shipped file, no user database)."""
    import json
    shipped = db.shipped_db_path()
    if shipped is None:
        pytest.skip("the package has no shipped tuning database")
    monkeypatch.delenv(db.ENV_USER_DB, raising=False)
    db.set_user_db(None)
    selection.clear_cache()
    with db.TuningDB(shipped, readonly=True) as h:
        rows = h.winners()
    assert rows
    try:
        for r in rows:
            key = WorkloadKey.from_row(r)
            got = selection.select(r["gpu_name"], r["sm_count"], r["cuda_version"], key)
            want = Variant.from_dict(json.loads(r["variant_json"]))
            assert got.source == "shipped" and got.variant == want, (key, got.reason)
    finally:
        selection.clear_cache()
