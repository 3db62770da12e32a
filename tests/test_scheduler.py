"""Properties of the split-KV tile scheduler (flash_mla.scheduler)."""

from __future__ import annotations

import random

import pytest
import torch

from flash_mla.scheduler import (BLOCK_M, BLOCK_N, FIXED_OVERHEAD_BLOCKS, METADATA_SIZE, max_total_splits,
                                 num_sm_parts, partition_work, schedule)

OV = FIXED_OVERHEAD_BLOCKS


def random_seqlens(rng: random.Random, b: int) -> list[int]:
    kind = rng.choice(["mixed", "short", "long", "zeros", "equal"])
    if kind == "zeros":
        return [0] * b
    if kind == "equal":
        return [rng.choice([1, 63, 64, 65, 4096, 6000])] * b
    if kind == "short":
        return [rng.randint(0, 3 * BLOCK_N) for _ in range(b)]
    if kind == "long":
        return [rng.randint(1, 40000) for _ in range(b)]
    return [rng.choice([0, rng.randint(1, BLOCK_N), rng.randint(1, 5000), rng.randint(1, 40000)])
            for _ in range(b)]


def _random_cases(n: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        b = rng.choice([0, 1, 2, rng.randint(0, 64), 64])
        parts = rng.choice([1, rng.randint(1, 140), 132, 66, 140])
        cases.append((random_seqlens(rng, b), parts))
    return cases


EDGE_CASES = [
    ([], 1), ([], 132),
    ([0], 1), ([0], 7), ([0, 0, 0], 5), ([0] * 64, 140),
    ([1], 1), ([1], 140), ([64], 3), ([65], 140),
    ([32768], 132), ([32768] * 2, 140), ([6000] * 64, 66),
    ([0, 1, 0, 64, 0, 65, 0], 4), ([100000, 1, 1, 1], 10),
    ([1] * 64, 1), ([1] * 64, 140), ([BLOCK_N * 3] * 5, 3),
]


def check_schedule(lens: list[int], parts: int, min_payload: int = 1):
    cs = torch.tensor(lens, dtype=torch.int32)
    meta, num_splits = schedule(cs, parts, min_payload=min_payload)
    b = len(lens)

    # dtypes, shapes
    assert meta.dtype == torch.int32 and meta.shape == (parts, METADATA_SIZE) and meta.is_contiguous()
    assert num_splits.dtype == torch.int32 and num_splits.shape == (b + 1,)
    assert meta.device == cs.device and num_splits.device == cs.device

    meta_l = meta.tolist()
    ns = num_splits.tolist()
    nb = [-(-x // BLOCK_N) for x in lens]
    assert ns[0] == 0
    assert all(ns[i + 1] > ns[i] for i in range(b)), f"a request is touched by no partition: {ns}"
    assert ns[-1] <= max_total_splits(b, parts)

    # the model: requests end to end on one work line, partition p owns [p * payload, (p + 1) * payload)
    starts, c = [], 0
    for n in nb:
        starts.append(c)
        c += n + OV
    total = c
    payload = max(-(-total // parts), min_payload)

    covered = [[0] * n for n in nb]
    touches = [[] for _ in range(b)]                   # (partition, split slot) per request
    order = []                                         # (req, block) in partition order
    for p, row in enumerate(meta_l):
        items = partition_work(row, ns, lens)
        if row[2] < row[0]:
            assert items == [], f"idle partition {p} has work"
            assert row == [0, 0, -1, 0, 0, 0, 0, 0], f"idle partition {p}: {row}"
            continue
        i0 = row[0]                                    # columns 5..7: the first request's length and splits
        assert row[5:] == [max(lens[i0], 0), ns[i0], ns[i0 + 1] - ns[i0]], f"partition {p}: {row}"
        assert 0 <= row[0] <= row[2] < b
        lo_p, hi_p = p * payload, min((p + 1) * payload, total)
        blocks = 0
        starts_here = 0
        for i, lo, hi, slot, is_split in items:
            assert 0 <= lo <= hi <= nb[i], (p, i, lo, hi, nb[i])
            assert (hi > lo) or nb[i] == 0, f"partition {p} touches request {i} without work"
            for k in range(lo, hi):
                covered[i][k] += 1
                order.append((i, k))
            touches[i].append((p, slot))
            assert ns[i] <= slot < ns[i + 1], (p, i, slot, ns[i], ns[i + 1])
            assert is_split == (ns[i + 1] - ns[i] > 1)
            blocks += hi - lo
            starts_here += lo_p <= starts[i] < hi_p
        # balance: the blocks fit in the partition's share; with the fixed cost of every request whose
        # work starts in this partition they exceed it by less than one request's fixed cost (the last
        # request's fixed cost may straddle the boundary); counting every touched request, the
        # one continued from the previous partition adds at most one more fixed cost.
        assert blocks <= payload
        assert blocks + OV * starts_here <= payload + OV - 1, (p, payload, items)
        assert blocks + OV * len(items) <= payload + 2 * OV - 1, (p, payload, items)

    for i in range(b):
        assert all(x == 1 for x in covered[i]), f"request {i}: block coverage {covered[i]}"
        n = ns[i + 1] - ns[i]
        assert len(touches[i]) == n, (i, touches[i], n)
        slots = [s for _, s in touches[i]]
        assert len(set(slots)) == n, f"request {i}: split slots not distinct: {slots}"
        assert sorted(slots) == list(range(ns[i], ns[i + 1]))
        if nb[i] == 0:
            assert n == 1, f"zero-length request {i} touched by {n} partitions"
    assert order == sorted(order), "partitions do not walk the work line in order"
    assert len(order) == sum(nb)
    return meta, num_splits


@pytest.mark.parametrize("lens,parts", EDGE_CASES, ids=[f"edge{i}" for i in range(len(EDGE_CASES))])
def test_edge_cases(lens, parts):
    check_schedule(lens, parts)


@pytest.mark.parametrize("seed", range(8))
def test_random(seed):
    for lens, parts in _random_cases(100, 1000 + seed):
        check_schedule(lens, parts)


@pytest.mark.parametrize("min_payload", [2, 4, 16, 1000])
def test_minimum_payload(min_payload):
    for lens, parts in EDGE_CASES + _random_cases(40, 77 + min_payload):
        check_schedule(lens, parts, min_payload)


def test_minimum_payload_cuts_a_short_request_into_fewer_splits():
    lens = [1024]                                     # 16 blocks
    _, few = check_schedule(lens, 132)                # payload 1: one block per split
    _, fewer = check_schedule(lens, 132, min_payload=4)
    assert few.tolist() == [0, 16]
    assert fewer.tolist() == [0, 5]                   # units [4, 8) hold blocks 0..2, then 4 blocks each
    with pytest.raises(ValueError, match="min_payload"):
        schedule(torch.tensor(lens, dtype=torch.int32), 132, min_payload=0)


def test_zero_length_requests():
    lens = [0, 200, 0, 0, 1000, 0]
    meta, num_splits = check_schedule(lens, 8)
    ns = num_splits.tolist()
    for i in (0, 2, 3, 5):
        assert ns[i + 1] - ns[i] == 1
    # every zero-length request is owned by exactly one busy partition
    owners = {i: [] for i in (0, 2, 3, 5)}
    for p, row in enumerate(meta.tolist()):
        for i, lo, hi, _, _ in partition_work(row, ns, lens):
            if i in owners:
                assert lo == hi == 0
                owners[i].append(p)
    assert all(len(v) == 1 for v in owners.values()), owners


def test_single_partition_does_everything():
    lens = [5, 0, 700, 64]
    meta, num_splits = schedule(torch.tensor(lens, dtype=torch.int32), 1)
    assert meta.tolist() == [[0, 0, 3, 1, 0, 5, 0, 1]]   # columns 5..7: request 0 has length 5, one split at slot 0
    assert num_splits.tolist() == [0, 1, 2, 3, 4]


def test_long_request_is_split_evenly():
    lens = [64 * 1000]
    parts = 10
    meta, num_splits = check_schedule(lens, parts)
    assert num_splits.tolist() == [0, parts]
    sizes = [hi - lo for row in meta.tolist() for _, lo, hi, _, _ in partition_work(row, num_splits, lens)]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= OV + 1


def test_more_partitions_than_work():
    lens = [1, 1]
    meta, num_splits = check_schedule(lens, 140)
    busy = [row for row in meta.tolist() if row[2] >= row[0]]
    assert 1 <= len(busy) <= 2
    assert num_splits.tolist() == [0, 1, 2]


def test_schedule_rejects_zero_parts():
    with pytest.raises(ValueError, match="num_parts"):
        schedule(torch.tensor([10], dtype=torch.int32), 0)


def test_deterministic():
    lens = torch.tensor([3000, 0, 17, 40000, 64], dtype=torch.int32)
    a = schedule(lens, 66)
    b = schedule(lens.clone(), 66)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("num_sms,heads_per_k,h_kv,want", [
    (132, 128, 1, 66),      # h_q = 128, MQA: two 64-row CTAs per part
    (132, 64, 1, 132),
    (132, 16, 1, 132),
    (132, 1, 1, 132),
    (132, 256, 1, 33),      # s_q = 2, h_q = 128
    (132, 65, 1, 66),
    (132, 16, 8, 16),
    (132, 8, 2, 66),
    (78, 128, 1, 39),
    (114, 128, 1, 57),
    (4, 128, 8, 1),         # never below one partition
])
def test_num_sm_parts(num_sms, heads_per_k, h_kv, want):
    got = num_sm_parts(num_sms, heads_per_k, h_kv)
    assert got == want
    m_blocks = -(-heads_per_k // BLOCK_M)
    assert got * h_kv * m_blocks <= max(num_sms, h_kv * m_blocks)


def test_max_total_splits():
    assert max_total_splits(0, 1) == 1
    assert max_total_splits(64, 132) == 196


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit():
    for lens, parts in _random_cases(40, 77) + EDGE_CASES:
        cpu = torch.tensor(lens, dtype=torch.int32)
        m_cpu, n_cpu = schedule(cpu, parts)
        m_gpu, n_gpu = schedule(cpu.cuda(), parts)
        assert m_gpu.is_cuda and n_gpu.is_cuda
        assert m_gpu.dtype == torch.int32 and n_gpu.dtype == torch.int32
        assert torch.equal(m_gpu.cpu(), m_cpu), (lens, parts)
        assert torch.equal(n_gpu.cpu(), n_cpu), (lens, parts)


def _schedule_by_search(lens, parts, overhead=FIXED_OVERHEAD_BLOCKS, min_payload=1):
    """The algorithm of templates/kernels/schedule.cuh in plain Python (starts by a prefix sum, split counts by
    division, each partition's requests by two binary searches over the claims), to check it against the
    specification on the CPU; the GPU test below checks the kernel itself."""
    b = len(lens)
    nb = [(max(x, 0) + BLOCK_N - 1) // BLOCK_N for x in lens]
    start = [0] * (b + 1)
    for i in range(b):
        start[i + 1] = start[i] + nb[i] + overhead
    total = start[b]
    payload = max((total + parts - 1) // parts, min_payload)
    splits = [0]
    for i in range(b):
        if nb[i] > 0:
            lo = start[i] + overhead
            splits.append(splits[-1] + (lo + nb[i] - 1) // payload - lo // payload + 1)
        else:
            splits.append(splits[-1] + (1 if start[i] < total else 0))
    claim_lo = [start[i] + overhead if nb[i] else start[i] for i in range(b)]
    claim_hi = [start[i + 1] if nb[i] else start[i] + 1 for i in range(b)]
    meta = []
    for p in range(parts):
        s, e = p * payload, min((p + 1) * payload, total)
        first = next((i for i in range(b) if claim_hi[i] > s), b)        # the kernel: binary searches
        last = next((i for i in range(b) if claim_lo[i] >= e), b) - 1
        if s >= e or first > last:
            meta.append([0, 0, -1, 0, 0, 0, 0, 0])
            continue
        first_part = claim_lo[first] // payload
        meta.append([first, min(max(s - start[first] - overhead, 0), nb[first]), last,
                     min(max(e - start[last] - overhead, 0), nb[last]), p - first_part,
                     max(lens[first], 0), splits[first], splits[first + 1] - splits[first]])
    return meta, splits


@pytest.mark.parametrize("min_payload", [1, 3, 1000])
@pytest.mark.parametrize("overhead", [0, 1, FIXED_OVERHEAD_BLOCKS])
def test_the_kernels_algorithm_equals_the_specification(overhead, min_payload):
    for lens, parts in EDGE_CASES + _random_cases(60, 5 + overhead + min_payload):
        meta, splits = schedule(torch.tensor(lens, dtype=torch.int32), parts, overhead=overhead,
                                min_payload=min_payload)
        want = (meta.tolist(), splits.tolist())
        assert _schedule_by_search(lens, parts, overhead, min_payload) == want, (lens, parts)


@pytest.mark.gpu
@pytest.mark.parametrize("min_payload", [1, 3, 1000])
@pytest.mark.parametrize("overhead", [0, 1, FIXED_OVERHEAD_BLOCKS])
def test_schedule_kernel_matches_the_specification_bit_for_bit(overhead, min_payload):
    from flash_mla import dispatch
    lib = dispatch.schedule_library()
    cases = EDGE_CASES + _random_cases(60, 11 + overhead) + [([4096] * 700 + [0] * 300, 132), ([], 7)]
    for lens, parts in cases:
        cpu = torch.tensor(lens, dtype=torch.int32)
        m_cpu, n_cpu = schedule(cpu, parts, overhead=overhead, min_payload=min_payload)
        m_gpu, n_gpu = lib.schedule(cpu.cuda(), parts, overhead, min_payload)
        assert m_gpu.dtype == torch.int32 and n_gpu.dtype == torch.int32
        assert torch.equal(m_gpu.cpu(), m_cpu), (lens, parts)
        assert torch.equal(n_gpu.cpu(), n_cpu), (lens, parts)
