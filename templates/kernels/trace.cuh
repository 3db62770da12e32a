// Diagnostics of a trace build (variant trace=True), in one device buffer read back through fmla_trace_read.
// - qreg schedules (FMLA_TRACE): CTA (0, 0, 0) stamps clock() (32-bit SM cycles: compare them modulo 2^32) at
//   each phase of its first kTraceTiles tiles, per warpgroup, into g_fmla_trace[warpgroup][tile][event]
//   (trace_stamp; bench/trace_qreg.py).
// - nsplit schedule (FMLA_TIMELINE): thread 0 of each of the first kTimelineCtas decode CTAs and of the first
//   kTimelineMergeCtas merge CTAs (linear block index) stamps the start-up and end of its work, each event as the
//   low 32 bits of %globaltimer (ns, comparable across SMs) and of clock64 (cycles of its own SM), into
//   g_fmla_trace[region + cta][event] and [region + cta][kTimelineEvents + event] (timeline_stamp;
//   bench/timeline.py).
// Without either macro both stamps are empty.
#pragma once

namespace fmla {

constexpr int kTraceWarpgroups = 3, kTraceTiles = 256, kTraceEvents = 8;
constexpr int kTraceSize = kTraceWarpgroups * kTraceTiles * kTraceEvents;
constexpr int kTimelineEvents = 8, kTimelineSlots = 2 * kTimelineEvents;
constexpr int kTimelineCtas = 256, kTimelineMergeCtas = kTraceSize / kTimelineSlots - kTimelineCtas;
static_assert(kTimelineMergeCtas > 0, "the timeline regions must fit the trace buffer");

#if defined(FMLA_TRACE) || defined(FMLA_TIMELINE)
__device__ unsigned g_fmla_trace[kTraceSize];
inline void* g_fmla_trace_ptr() {
  void* p = nullptr;
  cudaGetSymbolAddress(&p, g_fmla_trace);
  return p;
}
#endif

__device__ __forceinline__ void trace_stamp(int wg, int tile, int event) {
#ifdef FMLA_TRACE
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && tile < kTraceTiles && threadIdx.x % 128 == 0)
    g_fmla_trace[(wg * kTraceTiles + tile) * kTraceEvents + event] = unsigned(clock());
#endif
}

// Timeline events of a decode CTA (kMerge = false) or a merge CTA (kMerge = true); called by every thread, thread 0
// writes.
template <bool kMerge>
__device__ __forceinline__ void timeline_stamp(int event) {
#ifdef FMLA_TIMELINE
  const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (threadIdx.x == 0 && cta < (kMerge ? kTimelineMergeCtas : kTimelineCtas)) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    unsigned* slot = g_fmla_trace + ((kMerge ? kTimelineCtas : 0) + cta) * kTimelineSlots;
    slot[event] = unsigned(ns);
    slot[kTimelineEvents + event] = unsigned(clock64());
  }
#endif
}

}  // namespace fmla
