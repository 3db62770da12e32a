// The split-KV schedule of get_mla_metadata in one kernel launch: flash_mla/scheduler.py's schedule() (the
// specification, tested on the CPU) computed by one CTA, bit-identical to it, with no host sync.
//
// Work line: request i costs work_i = nb_i + overhead units (nb_i = ceil(max(len_i, 0) / kSchedBlockN)) and
// starts at start_i (exclusive prefix sum); partition p owns units [p * payload, min((p + 1) * payload, total))
// with payload = max(ceil(total / parts), min_payload). Request i "claims" its block units
// [start_i + overhead, start_{i+1}) or, with no blocks, the single unit start_i; it touches partition p where its
// claim meets p's units. Claims are disjoint and ordered by i, so the requests a partition touches are a
// contiguous range, found by two binary searches over the starts; the partitions a request touches are
// consecutive, counted by division.
// Passes: (1) starts (block-wide scan, into the int64 workspace of b + 1 entries), (2) splits per request and
// their prefix sum (num_splits), (3) one thread per partition writes its metadata row (columns 5..7 copy the
// first request's length and num_splits entries, written by this block in pass 2).
#pragma once

#include <cub/block/block_scan.cuh>

#include "mla_constants.h"

namespace fmla {

constexpr int kScheduleThreads = 512;

struct ScheduleArgs {
  const int32_t* seqlens;     // (b,)
  int32_t* metadata;          // (parts, kMetadataSize)
  int32_t* num_splits;        // (b + 1,)
  long long* start;           // (b + 1,) workspace: start_i, then the total
  int b, parts, overhead, min_payload;
};

__device__ __forceinline__ long long sched_blocks(const int32_t* seqlens, int i) {
  return (static_cast<long long>(max(seqlens[i], 0)) + kSchedBlockN - 1) / kSchedBlockN;
}

__global__ void __launch_bounds__(kScheduleThreads) schedule_kernel(const ScheduleArgs a) {
  using Scan = cub::BlockScan<long long, kScheduleThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int t = threadIdx.x;

  long long carry = 0;                          // (1) start_i
  for (int base = 0; base < a.b; base += kScheduleThreads) {
    const int i = base + t;
    const long long w = i < a.b ? sched_blocks(a.seqlens, i) + a.overhead : 0;
    long long excl, sum;
    Scan(scan_storage).ExclusiveSum(w, excl, sum);
    if (i < a.b) a.start[i] = carry + excl;
    carry += sum;
    __syncthreads();                            // scan_storage is reused
  }
  const long long total = carry;
  const long long payload = max((total + a.parts - 1) / a.parts, static_cast<long long>(a.min_payload));
  if (t == 0) a.start[a.b] = total;
  __syncthreads();                              // every start written and visible to the block

  if (t == 0) a.num_splits[0] = 0;              // (2) partitions touching each request, summed
  long long splits = 0;
  for (int base = 0; base < a.b; base += kScheduleThreads) {
    const int i = base + t;
    long long n = 0;
    if (i < a.b) {
      const long long s = a.start[i], nb = sched_blocks(a.seqlens, i);
      if (nb > 0) n = (s + a.overhead + nb - 1) / payload - (s + a.overhead) / payload + 1;
      else n = s < total ? 1 : 0;
    }
    long long incl, sum;
    Scan(scan_storage).InclusiveSum(n, incl, sum);
    if (i < a.b) a.num_splits[i + 1] = static_cast<int32_t>(splits + incl);
    splits += sum;
    __syncthreads();
  }

  for (int p = t; p < a.parts; p += kScheduleThreads) {   // (3) metadata rows
    const long long s = p * payload, e = min((p + 1) * payload, total);
    // claim of request i: [lo, hi); both bounds are non-decreasing in i
    auto claim_lo = [&](int i) { return sched_blocks(a.seqlens, i) > 0 ? a.start[i] + a.overhead : a.start[i]; };
    auto claim_hi = [&](int i) { return sched_blocks(a.seqlens, i) > 0 ? a.start[i + 1] : a.start[i] + 1; };
    int lo = 0, hi = a.b;                       // first request whose claim ends after s
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (claim_hi(mid) > s) hi = mid; else lo = mid + 1;
    }
    const int first = lo;
    lo = 0, hi = a.b;                           // first request whose claim starts at or after e
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (claim_lo(mid) >= e) hi = mid; else lo = mid + 1;
    }
    const int last = lo - 1;
    int32_t* row = a.metadata + static_cast<long long>(p) * kMetadataSize;
    for (int c = 0; c < kMetadataSize; ++c) row[c] = 0;
    if (s >= e || first > last) {               // idle partition
      row[2] = -1;
      continue;
    }
    const long long nb_first = sched_blocks(a.seqlens, first), nb_last = sched_blocks(a.seqlens, last);
    const long long first_part = nb_first > 0 ? (a.start[first] + a.overhead) / payload : a.start[first] / payload;
    row[0] = first;
    row[1] = static_cast<int32_t>(min(max(s - a.start[first] - a.overhead, 0ll), nb_first));
    row[2] = last;
    row[3] = static_cast<int32_t>(min(max(e - a.start[last] - a.overhead, 0ll), nb_last));
    row[4] = static_cast<int32_t>(p - first_part);
    row[5] = max(a.seqlens[first], 0);          // the first request's length and splits: no dependent reads
    row[6] = a.num_splits[first];               // at the decode CTA's start
    row[7] = a.num_splits[first + 1] - a.num_splits[first];
  }
}

// Launch on `stream`; returns the cudaError_t of the launch.
inline int launch_schedule(const ScheduleArgs& a, cudaStream_t stream) {
  schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fmla
