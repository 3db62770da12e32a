// Combine kernel: merges the partial (out, lse) of requests split across partitions.
// merge == "separate": one warp per q row, Cfg::kCombineRows rows per CTA, each warp walks every split;
// requests with a single split return at once.
// merge == "wide_pdl": launched with programmatic dependent launch behind the decode kernel; one CTA per
// (split request, kv head, block of rows, 64-channel slice), the split weights computed once per row in
// shared memory, split loads issued independently by 8 groups of 16 threads.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "mla_constants.h"
#include "params.h"
#include "trace.cuh"

namespace fmla {

// The "separate" merge.
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kCombineRows * 32)
combine_kernel(const __grid_constant__ FmlaParams p) {
  using Element = typename Cfg::Element;
  constexpr int kCombineRows = Cfg::kCombineRows;
  const int req = blockIdx.x, hk = blockIdx.y;
  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  if (n <= 1) return;
  const int groups = p.h_q / p.h_kv;
  const int rows = p.s_q * groups;
  const int rr = blockIdx.z * kCombineRows + threadIdx.x / 32;
  if (rr >= rows) return;
  const int lane = threadIdx.x % 32;

  // Max lse over splits, then weights exp(lse_j - max); each lane scans a strided subset.
  float mx = -INFINITY;
  for (int j = lane; j < n; j += 32)
    mx = fmaxf(mx, p.lse_accum[(int64_t(first + j) * p.h_kv + hk) * rows + rr]);
  CUTE_UNROLL
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float den = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float l = p.lse_accum[(int64_t(first + j) * p.h_kv + hk) * rows + rr];
    den += mx == -INFINITY ? 0.f : expf(l - mx);
  }
  CUTE_UNROLL
  for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);

  // Each lane owns 16 channels: 4 float4 loads per split.
  float acc[16];
  CUTE_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  if (den > 0.f) {
    for (int j = 0; j < n; ++j) {
      const int64_t row = (int64_t(first + j) * p.h_kv + hk) * rows + rr;
      const float w = expf(p.lse_accum[row] - mx) / den;
      if (w == 0.f) continue;
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + row * kHeadDimV);
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const float4 x = src[v * 32 + lane];
        acc[4 * v + 0] += w * x.x; acc[4 * v + 1] += w * x.y;
        acc[4 * v + 2] += w * x.z; acc[4 * v + 3] += w * x.w;
      }
    }
  }
  const int sq = rr / groups, head = hk * groups + rr % groups;
  Element* dst = static_cast<Element*>(p.out) + ((int64_t(req) * p.s_q + sq) * p.h_q + head) * kHeadDimV;
  CUTE_UNROLL
  for (int v = 0; v < 4; ++v) {
    Element e[4] = {Element(acc[4 * v]), Element(acc[4 * v + 1]), Element(acc[4 * v + 2]), Element(acc[4 * v + 3])};
    *reinterpret_cast<uint2*>(dst + (v * 32 + lane) * 4) = *reinterpret_cast<uint2*>(e);
  }
  if (lane == 0)
    p.lse[(int64_t(req) * p.h_q + head) * p.s_q + sq] = den > 0.f ? mx + logf(den) : INFINITY;
}

constexpr int kWideThreads = 128;
constexpr int kWideCols = 64;                       // channels per CTA: 16 threads x float4
constexpr int kWideGroups = kWideThreads / 16;      // groups of 16 threads, each on its own splits
constexpr int kWideSlices = kHeadDimV / kWideCols;

// grid: x = (kv head, row block, channel slice), y = request (by_partition == 0) or partition (== 1:
// batch > partitions; the partition holding a split request's last split merges it, which is exactly
// one partition per split request). Dynamic shared memory: rows_per_cta * weight_stride floats.
// The "wide_pdl" merge.
template <class Cfg>
__global__ void __launch_bounds__(kWideThreads)
combine_kernel(const __grid_constant__ FmlaParams p, int rows_per_cta, int weight_stride, int by_partition) {
  using Element = typename Cfg::Element;
  timeline_stamp<true>(0);                          // (trace builds only) entry
  extern __shared__ float w_smem[];                 // [rows_per_cta][weight_stride] split weights
  __shared__ float4 part_sum[kWideGroups][kWideCols / 4];
  __shared__ float row_lse[kWideGroups];
  const int R = rows_per_cta;
  const int groups = p.h_q / p.h_kv;
  const int rows = p.s_q * groups;
  const int row_blocks = (rows + R - 1) / R;
  const int slice = blockIdx.x % kWideSlices;
  const int rb = (blockIdx.x / kWideSlices) % row_blocks;
  const int hk = blockIdx.x / kWideSlices / row_blocks;
  // Schedule reads only: metadata and num_splits were complete before the decode kernel started.
  int req = blockIdx.y;
  if (by_partition) {
    const int* meta = p.metadata + blockIdx.y * kMetadataSize;
    req = meta[0];
    if (meta[2] < req) return;                      // idle partition
    if (meta[4] != p.num_splits[req + 1] - p.num_splits[req] - 1) return;
  }
  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  if (n <= 1) return;
  asm volatile("griddepcontrol.wait;" ::: "memory");   // the decode kernel's partials are visible
  timeline_stamp<true>(1);                          // the decode grid is complete

  // Per-row weights exp(lse_j - max), once per CTA: warp w handles rows w, w + 4, ...
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kWideThreads / 32) {
    const int rr = rb * R + r;
    if (rr >= rows) break;
    const float* ls = p.lse_accum + (int64_t(first) * p.h_kv + hk) * rows + rr;
    const int64_t ls_stride = int64_t(p.h_kv) * rows;
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, ls[j * ls_stride]);
    CUTE_UNROLL
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float den = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float e = mx == -INFINITY ? 0.f : expf(ls[j * ls_stride] - mx);
      w_smem[r * weight_stride + j] = e;
      den += e;
    }
    CUTE_UNROLL
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    const float inv = den > 0.f ? 1.f / den : 0.f;
    for (int j = lane; j < n; j += 32) w_smem[r * weight_stride + j] *= inv;
    if (lane == 0) row_lse[r] = den > 0.f ? mx + logf(den) : INFINITY;
  }
  __syncthreads();
  timeline_stamp<true>(2);                          // split weights computed

  // Group g sums splits j = g / R, g / R + stride, ... of row g % R: four independent loads per step.
  const int g = threadIdx.x / 16, t = threadIdx.x % 16;
  const int r = g % R, stride = kWideGroups / R;
  const int rr = rb * R + r;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (g < R * stride && rr < rows) {
    const float* wr = w_smem + r * weight_stride;
    const int64_t split_stride = int64_t(p.h_kv) * rows * kHeadDimV;
    const float4* src = reinterpret_cast<const float4*>(
        p.o_accum + ((int64_t(first) * p.h_kv + hk) * rows + rr) * kHeadDimV + slice * kWideCols) + t;
    int j = g / R;
    for (; j + 3 * stride < n; j += 4 * stride) {
      float4 x[4];
      CUTE_UNROLL
      for (int u = 0; u < 4; ++u) x[u] = __ldcs(src + (j + u * stride) * (split_stride / 4));
      CUTE_UNROLL
      for (int u = 0; u < 4; ++u) {
        const float w = wr[j + u * stride];
        acc.x += w * x[u].x; acc.y += w * x[u].y; acc.z += w * x[u].z; acc.w += w * x[u].w;
      }
    }
    for (; j < n; j += stride) {
      const float4 x = __ldcs(src + j * (split_stride / 4));
      const float w = wr[j];
      acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
    }
  }
  part_sum[g][t] = acc;
  __syncthreads();
  if (threadIdx.x < R * 16) {
    const int r2 = threadIdx.x / 16;
    const int rr2 = rb * R + r2;
    if (rr2 < rows) {
      float4 s = part_sum[r2][t];
      for (int ph = 1; ph < stride; ++ph) {
        const float4 y = part_sum[ph * R + r2][t];
        s.x += y.x; s.y += y.y; s.z += y.z; s.w += y.w;
      }
      const int sq = rr2 / groups, head = hk * groups + rr2 % groups;
      Element* dst = static_cast<Element*>(p.out) + ((int64_t(req) * p.s_q + sq) * p.h_q + head) * kHeadDimV +
                     slice * kWideCols + t * 4;
      Element e[4] = {Element(s.x), Element(s.y), Element(s.z), Element(s.w)};
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<uint2*>(e);
      if (slice == 0 && t == 0) p.lse[(int64_t(req) * p.h_q + head) * p.s_q + sq] = row_lse[r2];
    }
  }
  timeline_stamp<true>(3);                          // output stored
}

}  // namespace fmla
