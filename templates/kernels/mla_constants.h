// The problem's fixed sizes, shared by every kernel header. flash_mla/constants.py holds the same values for
// the Python side (tests/test_codegen.py checks that the two agree).
#pragma once

namespace fmla {

constexpr int kHeadDim = 576;        // q / k head dim: 512 latent channels + 64 rope channels
constexpr int kHeadDimV = 512;       // v head dim = the leading channels of k
constexpr int kRopeDim = 64;         // rope channels (the last 64 of q / k)
constexpr int kBlockM = 64;          // q rows per CTA (wgmma M)
constexpr int kSchedBlockN = 64;     // scheduler block in KV tokens (flash_mla/scheduler.py)
constexpr int kMetadataSize = 8;     // int32 columns of a tile-scheduler metadata row
constexpr int kQregChannels = 384;   // qreg schedule: Q channels held in registers (the other 192 in shared memory)
constexpr int kProducerRegs = 40;    // full_wg with a producer warpgroup: its registers per thread (setmaxnreg.dec)
constexpr int kConsumerRegs = 232;   // ... and each consumer warpgroup's (setmaxnreg.inc): 128 * (40 + 2 * 232) <= 64K

}  // namespace fmla
