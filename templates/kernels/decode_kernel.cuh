// Split-KV MLA decode kernel for SM90.
// One CTA = Cfg::kNumWarpgroups warpgroups working on a 64-row tile of q rows (s_q x heads of one kv head).
// KV tiles of BLOCK_N tokens arrive by TMA (one 4-D box per 64 channels and page slice) into a ring of
// STAGES shared-memory buffers completing on mbarriers. Warpgroup w computes columns
// [w*BN/NWG, (w+1)*BN/NWG) of S = Q K^T with wgmma (SS), the CTA exchanges row maxima through shared
// memory, P goes to shared memory, and warpgroup w accumulates output channels [w*512/NWG, ...) of P V
// with wgmma (SS, V read as the MN-major view of the same K tile).
// qk == "full_wg" / "full_wg_ahead": warpgroup 0 computes the whole 64 x BLOCK_N S tile (wgmma N = BLOCK_N,
// so Q is read from shared memory once per tile, not once per warpgroup) and its softmax, and writes P
// into the stage's rope chunk (channels 512..575, which only QK reads and which has exactly P's size);
// both warpgroups then accumulate their half of the output channels from it. The pipeline runs on
// mbarriers instead of __syncthreads: full (TMA bytes landed), pready (P and the row rescale published
// by warpgroup 0), empty (both warpgroups done with the stage; the producer thread of warpgroup 1 then
// refills it). "full_wg" issues P V of tile j before Q K^T of tile j+1 (warpgroup 0 releases the stage once
// its P V ends; with Cfg::kReleaseEarly before it waits for tile j+1's bytes, otherwise behind Q K^T of tile
// j+1; with Cfg::kPvBehindQk warpgroup 1 gets P of tile j only once Q K^T of tile j+1 is done);
// "full_wg_ahead" issues Q K^T of tile j+1 first, so the softmax of tile j+1 overlaps P V of tile j (needs a
// deeper ring to keep the loads ahead). full_wg with Cfg::kPvRegs: warpgroup 0's own P V reads P from the
// registers of its softmax (register-A wgmma), only warpgroup 1 reads the stored copy; with Cfg::kCluster
// = 2: two row blocks share each K tile by TMA multicast, as in decode_qreg.cuh (release_stage). full_wg with
// Cfg::kProducerWg: a third warpgroup (setmaxnreg) issues every load; its first thread walks the CTA's whole
// work list (produce_full_wg), so the consumers never fill or drain the ring at a request boundary: Q of the
// next request is loaded once warpgroup 0 has arrived on qempty after its last Q K^T of the request before.
// A float8 e4m3 KV cache (Cfg::KvElement != Element; nsplit only): the TMA ring holds the tiles as stored (one
// byte per channel, unswizzled 192-channel boxes); at the top of each tile all threads widen it into one
// bf16 K tile in the swizzled layout the wgmmas read (exact: every e4m3 value is a bf16 value), and the fp8
// stage is refilled at once. The dequantisation scale multiplies the logits' scale and the output.
// The body is a template on a configuration struct (rendered per variant by codegen: see
// templates/variant.cu.j2), the knobs selected with if constexpr.
#pragma once

#include <type_traits>

#include <cuda.h>
#include <cute/tensor.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "mla_constants.h"
#include "params.h"
#include "trace.cuh"

namespace fmla {

using namespace cute;

// Who computes S = Q K^T (codegen/variant.py, QKS) and how split requests are merged (MERGES).
enum class Qk { kNsplit, kFullWg, kFullWgAhead, kSwap, kQreg, kQregAhead };
enum class Merge { kSeparate, kWidePdl };

// Shared memory of the nsplit schedule: a P buffer and row exchanges.
template <class Element, class LQ, class LK, class LP, int kStages, int kNWG, int kBM>
struct alignas(1024) SharedStorageNsplit {
  alignas(1024) Element q[cosize_v<LQ>];
  alignas(1024) Element k[kStages][cosize_v<LK>];
  alignas(1024) Element p[cosize_v<LP>];
  float row_max[kNWG][kBM];
  float row_sum[kNWG][kBM];
  alignas(8) uint64_t full[kStages];
  uint64_t qfull;                         // the request's Q tile landed (Q by TMA)
};

// Shared memory of the nsplit schedule over a float8 KV cache: the ring of stored (fp8) tiles, one bf16 tile
// widened from the current stage, P and the row exchanges.
template <class Element, class LQ, class LK, class LP, int kStages, int kNWG, int kBM, int kStageBytes>
struct alignas(1024) SharedStorageNsplitFp8 {
  alignas(1024) Element q[cosize_v<LQ>];
  alignas(1024) Element k[1][cosize_v<LK>];
  alignas(1024) Element p[cosize_v<LP>];
  alignas(128) uint8_t k8[kStages][kStageBytes];
  float row_max[kNWG][kBM];
  float row_sum[kNWG][kBM];
  alignas(8) uint64_t full[kStages];
  uint64_t qfull;                         // the request's Q tile landed (Q by TMA)
};

// Shared memory of the swapped schedule (decode_swap.cuh): Q of Cfg::kRowsN rows, the K ring (bf16), or the
// stored fp8 ring plus one widened tile, P^T, and the per-q-row exchanges of warpgroup 0.
template <class Element, class LQ, class LK, class LP, int kBufs, int kStages, int kN, int kStages8, int kStageBytes8>
struct alignas(1024) SharedStorageSwap {
  alignas(1024) Element q[cosize_v<LQ>];
  alignas(1024) Element k[kBufs][cosize_v<LK>];
  alignas(1024) Element p[cosize_v<LP>];
  alignas(128) uint8_t k8[kStages8][kStageBytes8];
  float red[4][kN];                       // per-warp column maxima / sums of warpgroup 0
  float alpha[2][kN];                     // per-q-row rescale of O, by tile parity
  float inv[2][kN];                       // a request's (dequantisation scale) / row sum, by request parity
  float lse[2][kN];
  alignas(8) uint64_t full[kStages];
};

// Shared memory of the full_wg schedules: P lives in each stage's rope chunk; mbarrier pipeline.
template <class Element, class LQ, class LK, int kStages, int kBM, int kParts>
struct alignas(1024) SharedStorageFullWg {
  alignas(1024) Element q[cosize_v<LQ>];
  alignas(1024) Element k[kStages][cosize_v<LK>];   // chunk 8 (rope) of a stage holds its P after QK
  float alpha[kStages][kBM];              // per-row rescale of O for the stage's tile (from warpgroup 0)
  float row_inv[kStages][kBM];            // 1 / row sum of a request, with the P of its last tile (warpgroup 0)
  alignas(8) uint64_t full[kStages * kParts];   // TMA bytes landed, per part of a stage (full_bar)
  uint64_t pready[kStages];               // P and alpha published (128 arrivals: warpgroup 0)
  uint64_t empty[kStages];                // stage consumed (256 arrivals: both warpgroups)
  uint64_t qfull;                         // the request's Q tile landed (Q by TMA)
  uint64_t qempty;                        // producer warpgroup: warpgroup 0 done reading the request's Q tile
};

// Shared memory of the qreg schedule (decode_qreg.cuh): Q's first kQregChannels channels live in warpgroup 0's
// registers, only the rest is here, which leaves room for a deeper ring; P lives in each stage's rope chunk;
// mbarrier pipeline.
template <class Element, class LQr, class LK, int kStages, int kBM, int kParts>
struct alignas(1024) SharedStorageQreg {
  alignas(1024) Element k[kStages][cosize_v<LK>];   // chunk 8 (rope) of a stage holds its P after QK
  alignas(1024) Element q[cosize_v<LQr>];           // Q's channels kQregChannels..575 (64 rows)
  float alpha[kStages][kBM];              // per-row rescale of O for the stage's tile (from warpgroup 0)
  float row_inv[kStages][kBM];            // 1 / row sum of a request, with the P of its last tile (warpgroup 0)
  alignas(8) uint64_t full[kStages * kParts];   // TMA bytes landed, per part of a stage (full_bar)
  uint64_t pready[kStages];               // P and alpha published (128 arrivals: warpgroup 0)
  uint64_t empty[kStages];                // stage consumed (256 arrivals: warpgroups 1 and 2)
};

// The tiled MMAs of a schedule (a specialisation per kind, so that only the chosen one is instantiated).
template <bool kSwap, class Element, int kBM, int kBN, int kBNw, int kDVw, int kD>
struct MmaPlan {                          // S = Q K^T (64 rows x this warpgroup's columns), O += P V
  using S = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
      Shape<Int<kBM>, Int<kBNw>, Int<kD>>>()));
  using O = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
      Shape<Int<kBM>, Int<kDVw>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>()));
};
template <class Element, int kBM, int kBN, int kBNw, int kDVw, int kD>
struct MmaPlan<true, Element, kBM, kBN, kBNw, kDVw, kD> {   // swapped: S^T = K Q^T, O^T += V^T P^T
  using S = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
      Shape<Int<kBN>, Int<kBM>, Int<kD>>>()));
  using O = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
      Shape<Int<64>, Int<kBM>, Int<kBN>>, GMMA::Major::MN, GMMA::Major::K>()));
};

// Everything a variant's configuration implies: sizes, shared-memory layouts, MMAs, shared storage.
template <class Cfg>
struct DecodeTraits {
  using Element = typename Cfg::Element;
  using KvElement = typename Cfg::KvElement;        // Element, or cutlass::float_e4m3_t (widened in shared memory)
  static constexpr bool kKvFp8 = !std::is_same_v<KvElement, Element>;
  static constexpr int kD = kHeadDim;               // q / k head dim (512 latent + 64 rope)
  static constexpr int kDV = kHeadDimV;             // v head dim = leading channels of k
  static constexpr bool kSwap = Cfg::kQk == Qk::kSwap;
  static constexpr bool kQreg = Cfg::kQk == Qk::kQreg || Cfg::kQk == Qk::kQregAhead;
  // q rows per CTA: the wgmma M of Q K^T, or in the swapped schedule its N (the tokens are M)
  static constexpr int kBM = kSwap ? Cfg::kRowsN : kBlockM;
  static constexpr int kBN = Cfg::kBlockN;          // KV tokens per pipeline stage
  static constexpr int kStages = Cfg::kStages;
  static constexpr int kNWG = Cfg::kNumWarpgroups;
  // producer = warpgroup (full_wg): a third warpgroup after the kNWG computing ones issues every load
  static constexpr bool kProducerWg = Cfg::kProducerWg;
  static constexpr int kConsumerThreads = kNWG * 128;
  static constexpr int kThreads = kConsumerThreads + (kProducerWg ? 128 : 0);
  // setmaxnreg of the producer-warpgroup schedule (mla_constants.h)
  static constexpr uint32_t kProducerRegs = fmla::kProducerRegs, kConsumerRegs = fmla::kConsumerRegs;
  static constexpr int kPage = Cfg::kPageSize;
  static constexpr int kSchedBlock = kSchedBlockN;  // scheduler block (tokens), flash_mla/scheduler.py
  static constexpr int kBoxRows = kBN < kPage ? kBN : kPage;   // TMA box rows: never crosses a page
  // TMA boxes per row: 64-channel (128-byte) swizzle chunks, or for fp8 three unswizzled 192-channel boxes
  static constexpr int kBoxCh = kKvFp8 ? 192 : 64;
  static constexpr int kChunks = kD / kBoxCh;
  // S columns per warpgroup: a share of them (nsplit), or all of them for warpgroup 0 (full_wg).
  static constexpr int kBNw = Cfg::kQk == Qk::kNsplit ? kBN / kNWG : kBN;
  // output channels per warpgroup (qreg: warpgroups 1 and 2 hold the output, warpgroup 0 computes S)
  static constexpr int kDVw = kDV / (kQreg ? 2 : kNWG);
  // qreg_ahead: Q K^T of tile j+1 issued before the softmax of tile j (two S accumulators in warpgroup 0)
  static constexpr bool kQkAhead = Cfg::kQk == Qk::kQregAhead;
  static constexpr int kCluster = Cfg::kCluster;     // CTAs (row blocks along grid z) sharing each K tile
  static constexpr int kProducer = 128;             // full_wg: thread that issues the TMA loads (first of wg 1)
  // Q by TMA where launch.cuh can describe q (start_request_tma): two-warpgroup nsplit and full_wg. (Four nsplit
  // warpgroups have 128 registers a thread; the second Q path made them spill.)
  static constexpr bool kQTma = !kSwap && !kQreg && kNWG == 2;
  static_assert(kSchedBlock % kBN == 0, "stage size must divide the scheduler block");
  static_assert(kBN % kBoxRows == 0 && kPage % kBoxRows == 0, "page size and stage size must nest");
  static_assert(kBNw % 8 == 0, "wgmma N must be a multiple of 8");
  static_assert(kD % kBoxCh == 0, "TMA boxes must tile the head dim");
  static_assert(!kKvFp8 || (kBoxCh % 64 == 0 && kBN % 4 == 0 && sizeof(Element) == 2),
                "fp8 widening: whole 64-channel chunks per box, four rows per warp step, 128-byte bf16 rows");
  static_assert(!kKvFp8 || ((Cfg::kQk == Qk::kNsplit || kSwap) && std::is_same_v<KvElement, cutlass::float_e4m3_t> &&
                            std::is_same_v<Element, cutlass::bfloat16_t>),
                "a float8 KV cache: e4m3 with bf16 q, nsplit or swapped schedule");
  static_assert(!Cfg::kWidenAhead || (kKvFp8 && kSwap && kStages == 1),
                "widen ahead: a float8 cache in the swapped schedule, one stored stage and two widened tiles");
  static_assert(!kSwap || (kBN == 64 && kNWG == 2 && kBM % 8 == 0 && kBM <= 64),
                "swapped schedule: the 64 tokens of a tile are warpgroup 0's wgmma M; 8..64 q rows are its N");
  static_assert(Cfg::kQk == Qk::kNsplit || kQreg || kNWG == 2,
                "full-width QK: warpgroup 0 computes S, both accumulate half of the output");
  static_assert(!kQreg || (kNWG == 3 && !kKvFp8 && (kD - kQregChannels) % 64 == 0 && kQregChannels % 64 == 0),
                "qreg: warpgroup 0 computes S from Q partly in registers, warpgroups 1 and 2 the two output halves; "
                "bf16 / fp16 cache; whole 64-channel chunks on each side");
  static_assert(kCluster == 1 || (kCluster == 2 && (kQreg || Cfg::kQk == Qk::kFullWg)),
                "K tiles multicast in clusters of 2: the qreg and full_wg schedules");
  static_assert(!kQkAhead || kStages >= 2, "qreg_ahead: the next tile is read while this one is in use");
  // tma = tile: one 5-D TMA per stage (launch.cuh make_kv_tensor_map), which needs the stage inside one page
  static constexpr bool kTmaTile = Cfg::kTmaTile;
  static_assert(!kTmaTile || (!kKvFp8 && kBoxRows == kBN),
                "tma=tile: one box per stage (page size >= block_n) of a bf16 / fp16 cache");
  // tma = tile3 / tile9: the stage in kTileParts 5-D TMAs of kChunks / kTileParts chunks each, each landing on its own full
  // barrier (full_bar), so that Q K^T starts on the first part while the others land (full_wg and qreg schedules)
  static constexpr int kTileParts = Cfg::kTileParts;
  static constexpr int kPartChunks = kChunks / kTileParts;
  static_assert(kTileParts == 1 || (kTmaTile && kChunks % kTileParts == 0 &&
                                    (kQreg || Cfg::kQk == Qk::kFullWg || Cfg::kQk == Qk::kFullWgAhead)),
                "tma=tile3 / tile9: whole chunks per part of a tile load, in the full_wg and qreg schedules");
  // pv = regs: full_wg's warpgroup 0 takes its own P for P V from the registers its softmax left it in
  static constexpr bool kPvRegs = Cfg::kPvRegs;
  // release = early (full_wg): warpgroup 0 waits for its own P V of tile j and releases the stage before it waits for
  // tile j+1, so a late tile j+1 does not hold back the refill of tile j's stage.
  static constexpr bool kReleaseEarly = Cfg::kReleaseEarly;
  // wg1_pv = with_softmax (full_wg): warpgroup 0 publishes P of tile j only once Q K^T of tile j+1 is done, so that
  // warpgroup 1's P V of tile j runs during warpgroup 0's softmax of tile j+1 instead of beside its Q K^T.
  static constexpr bool kPvBehindQk = Cfg::kPvBehindQk;
  static_assert(!(kReleaseEarly || kPvBehindQk) || Cfg::kQk == Qk::kFullWg,
                "release = early and wg1_pv = with_softmax reorder the full_wg schedule's warpgroup 0");
  static_assert(!kProducerWg || (Cfg::kQk == Qk::kFullWg && kTmaTile && kNWG == 2 &&
                                 kProducerRegs * 128 + kConsumerRegs * kConsumerThreads <= 64 * 1024),
                "producer = warpgroup: the full_wg schedule, a stage per 5-D TMA load, registers within the file");

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBM>, Int<kD>>{}));
  using SmemLayoutQr = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kBM>, Int<kD - kQregChannels>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBN>, Int<kD>>{}));
  // V^T: (channel, token) view of the same bytes as K, channel-contiguous => MN-major B operand of P V.
  using SmemLayoutVt = decltype(composition(SmemLayoutK{},
      make_layout(Shape<Int<kDV>, Int<kBN>>{}, Stride<Int<kBN>, _1>{})));
  using SmemLayoutP = decltype(tile_to_shape(
      std::conditional_t<(kBN >= 64), GMMA::Layout_K_SW128_Atom<Element>, GMMA::Layout_K_SW64_Atom<Element>>{},
      Shape<Int<kBM>, Int<kBN>>{}));
  static_assert(Cfg::kQk == Qk::kNsplit || kSwap || cosize_v<SmemLayoutP> == kBN * kRopeDim,
                "P must fill exactly the rope chunk of a stage");

  // S = Q K^T and O += P V; swapped: S^T = K Q^T (A = the K tile, B = Q) and O^T += V^T P^T (A = V^T, the
  // MN-major view of the K tile, B = P^T).
  using MmaS = typename MmaPlan<kSwap, Element, kBM, kBN, kBNw, kDVw, kD>::S;
  using MmaO = typename MmaPlan<kSwap, Element, kBM, kBN, kBNw, kDVw, kD>::O;
  // O += P V with P from registers (pv = regs): the A fragment of m64nNk16 holds, per thread, the same (row,
  // column) elements in the same order as the m64n(BLOCK_N) accumulator of S, so P is the S fragment converted.
  // (Declared with the full_wg shape for every schedule, so that its selector always sees a valid wgmma.)
  using MmaOr = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Element, Element, float,
      Shape<Int<kBlockM>, Int<kDV / 2>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>()));
  static_assert(!kPvRegs || (Cfg::kQk == Qk::kFullWg && kBM == kBlockM && kDVw == kDV / 2),
                "pv=regs: the full_wg schedule's warpgroup 0 (64 rows, two output halves)");

  using SharedStorage = std::conditional_t<kQreg,
      SharedStorageQreg<Element, SmemLayoutQr, SmemLayoutK, kStages, kBM, kTileParts>,
      std::conditional_t<kSwap,
      SharedStorageSwap<Element, SmemLayoutQ, SmemLayoutK, SmemLayoutP,
                        kKvFp8 ? (Cfg::kWidenAhead ? 2 : 1) : kStages, kStages, kBM,
                        kKvFp8 ? kStages : 1, kKvFp8 ? kBN * kD : 128>,
      std::conditional_t<kKvFp8,
      SharedStorageNsplitFp8<Element, SmemLayoutQ, SmemLayoutK, SmemLayoutP, kStages, kNWG, kBM, kBN * kD>,
      std::conditional_t<Cfg::kQk == Qk::kNsplit,
          SharedStorageNsplit<Element, SmemLayoutQ, SmemLayoutK, SmemLayoutP, kStages, kNWG, kBM>,
          SharedStorageFullWg<Element, SmemLayoutQ, SmemLayoutK, kStages, kBM, kTileParts>>>>>;
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;  // + slack to align the dynamic base
  static constexpr uint32_t kBoxBytes = kBoxRows * kBoxCh * sizeof(KvElement);
};

// No work before a k-block (issue_ss's default hook).
struct NoHook {
  __device__ __forceinline__ void operator()(int) const {}
};

// Issue acc = A * B (kAccumulate: acc += A * B) over every k-block of the tiled MMA as one wgmma batch;
// does not wait for it. `before(kb)` runs before k-block kb's wgmma is issued (tma = tile3 / tile9: the wait for the
// part of the K tile that k-block reads; the loop is unrolled, so its tests on kb are resolved at compile time).
template <bool kAccumulate, class Mma, class TA, class TB, class TC, class Hook = NoHook>
__device__ __forceinline__ void issue_ss(Mma& mma, TA const& tA, TB const& tB, TC& acc, Hook const& before = {}) {
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma.accumulate_ = kAccumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    before(kb);
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// acc = Q K^T in two parts into one fragment, one batch, not waited for: channels with Q from registers (`mma_n`,
// register-A fragments tQn), then those with Q from shared memory (`mma_r`, descriptors tQr) (the qreg schedules).
// `before(kb)` as in issue_ss, kb counting the k-blocks of both parts.
template <class MmaN, class TQn, class TKn, class MmaR, class TQr, class TKr, class TC, class Hook = NoHook>
__device__ __forceinline__ void issue_qk_split(MmaN& mma_n, TQn const& tQn, TKn const& tKn, MmaR& mma_r,
                                               TQr const& tQr, TKr const& tKr, TC& acc, Hook const& before = {}) {
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma_n.accumulate_ = GMMA::ScaleOut::Zero;
  constexpr int kKbN = decltype(size<2>(tQn))::value;
  CUTE_UNROLL
  for (int kb = 0; kb < kKbN; ++kb) {
    before(kb);
    cute::gemm(mma_n, tQn(_, _, kb), tKn(_, _, kb), acc);
    mma_n.accumulate_ = GMMA::ScaleOut::One;
  }
  mma_r.accumulate_ = GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tQr); ++kb) {
    before(kKbN + kb);
    cute::gemm(mma_r, tQr(_, _, kb), tKr(_, _, kb), acc);
  }
  warpgroup_commit_batch();
}

// acc = A * B (kAccumulate: acc += A * B), waited for.
template <bool kAccumulate, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_ss(Mma& mma, TA const& tA, TB const& tB, TC& acc) {
  issue_ss<kAccumulate>(mma, tA, tB, acc);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
}

// The same pointer, opaque to the optimiser (so values derived from it are not hoisted out of loops).
template <class T>
__device__ __forceinline__ T* opaque_ptr(T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Two e4m3 bytes of w (picked by the byte_perm selector into bytes 1 and 3) as two bf16. The byte's sign goes
// to bit 15 and its exponent and mantissa to bits 4..10: a bf16 with the e4m3 fields in place, worth
// 2^(7 - 127) times the e4m3 value (subnormals included); the multiply by 2^120 is exact. (The e4m3fn NaN
// encodings come out as +-480: a cache holds no NaN.)
template <uint32_t kSel>
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t w) {
  const uint32_t t = __byte_perm(w, 0u, kSel);
  uint32_t u = ((t & 0x7f007f00u) >> 4) | (t & 0x80008000u);
  uint32_t r;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(u), "r"(0x7b807b80u));   // 0x7b80 = bf16 2^120
  return r;
}

// Eight e4m3 values (8 bytes, channel order) -> eight bf16 (16 bytes).
__device__ __forceinline__ uint4 e4m3x8_to_bf16x8(uint2 x) {
  return make_uint4(e4m3x2_to_bf16x2<0x1404u>(x.x), e4m3x2_to_bf16x2<0x3424u>(x.x),
                    e4m3x2_to_bf16x2<0x1404u>(x.y), e4m3x2_to_bf16x2<0x3424u>(x.y));
}


// Keys visible to this thread's rows r0 and r0 + 8 of row block mb: the whole sequence, or under the causal
// mask (query position sq of s_q aligned to the sequence end) the first seqlen - (s_q - 1 - sq).
template <int kBM>
__device__ __forceinline__ void causal_limits(const FmlaParams& p, int mb, int r0, int groups, int rows, int seqlen,
                                              int (&limit)[2]) {
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int rr = mb * kBM + r0 + 8 * h;
    const int sq = rr / groups;
    limit[h] = (p.causal && rr < rows) ? seqlen - (p.s_q - 1 - sq) : seqlen;
  }
}

// The dynamic shared memory base aligned to 1024 bytes (128-byte swizzle atoms).
template <int kNWG>
__device__ __forceinline__ char* aligned_smem(char* smem_raw) {
  if constexpr (kNWG == 2) {
    // As an offset into the shared array itself: every access stays a shared-memory instruction (an
    // integer round trip of the address made them generic ones).
    const uint32_t pad = (1024u - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023u)) & 1023u;
    return smem_raw + pad;
  } else {
    // At the 128-register cap of four warpgroups the shared-space form above spills (88 B, nvcc 13.0): the
    // generic form stays spill-free.
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  }
}

// P of a stage's tile in the full_wg schedules: the rope chunk (channels 512..575) of the same stage, dead
// once Q K^T has run.
template <class Cfg, class SharedStorage>
__device__ __forceinline__ typename Cfg::Element* p_tile(SharedStorage& s, int stage) {
  using T = DecodeTraits<Cfg>;
  return s.k[stage] + (T::kDV / 64) * (T::kBN * 64);
}

// P of the nsplit schedule: its own buffer (the full_wg schedules never use this view).
template <class Cfg, class SharedStorage>
__device__ __forceinline__ typename Cfg::Element* p_buffer(SharedStorage& s) {
  if constexpr (Cfg::kQk == Qk::kNsplit) return s.p;
  else return p_tile<Cfg>(s, 0);
}

// A consumer thread is done with stage `st` (its wgmmas on it completed): it arrives on its CTA's empty barrier,
// and in a cluster one lane per warp also on every other CTA's (whose producer multicasts into this CTA too), so
// that no CTA refills a stage before the consumers of every CTA have released it.
// Arrivals that complete an empty barrier when `kConsumers` threads of every CTA release a stage (release_stage).
template <class Cfg, int kConsumers>
constexpr int kEmptyArrivals = kConsumers + (kConsumers / 32) * (DecodeTraits<Cfg>::kCluster - 1);

template <class Cfg, class Smem>
__device__ __forceinline__ void release_stage(Smem& s, int st) {
  cutlass::arch::ClusterBarrier::arrive(&s.empty[st]);
  if constexpr (DecodeTraits<Cfg>::kCluster > 1) {
    __syncwarp();                               // every lane's wgmma reads of the stage are done
    if (threadIdx.x % 32 == 0) {
      const uint32_t rank = cute::block_rank_in_cluster();
      CUTE_UNROLL
      for (uint32_t c = 0; c < DecodeTraits<Cfg>::kCluster; ++c)
        if (c != rank) cutlass::arch::ClusterBarrier::arrive(&s.empty[st], c, 1u);
    }
  }
}

// The full barrier of part `part` of stage `st` (one part per stage except with tma = tile3 / tile9).
template <class Cfg, class Smem>
__device__ __forceinline__ uint64_t* full_bar(Smem& s, int st, int part = 0) {
  return &s.full[st * DecodeTraits<Cfg>::kTileParts + part];
}

// issue_ss / issue_qk_split hook of tma = tile3 / tile9 for the tile of global stage counter `it`: before the first k-block
// of a later part of the K tile (kb: 16 channels each), wait for that part's bytes (the caller waited for part 0).
template <class Cfg, class Smem>
struct WaitTilePart {
  Smem& s;
  int it;
  __device__ __forceinline__ void operator()(int kb) const {
    using T = DecodeTraits<Cfg>;
    constexpr int kKbPerPart = T::kPartChunks * T::kBoxCh / 16;   // k-blocks of 16 channels (bf16 / fp16 wgmma K)
    if constexpr (T::kTileParts > 1) {
      if (kb > 0 && kb % kKbPerPart == 0)
        cutlass::arch::ClusterTransactionBarrier::wait(full_bar<Cfg>(s, it % T::kStages, kb / kKbPerPart),
                                                       (it / T::kStages) & 1);
    }
  }
};

// The L2 policy of a KV load (load_tile, load_stage): a tile read by one CTA (or one cluster) only is streamed (evict
// first); where several row blocks or clusters (gridDim.z > kCluster) read the same tile at about the same time, it
// stays in L2 for the others (evict normal).
template <class Cfg>
__device__ __forceinline__ uint64_t kv_load_hint() {
  return int(gridDim.z) > DecodeTraits<Cfg>::kCluster ? uint64_t(TMA::CacheHintSm90::EVICT_NORMAL)
                                                      : uint64_t(TMA::CacheHintSm90::EVICT_FIRST);
}

// This CTA's rank in its cluster (0 without clusters): which of the cluster's share of a stage's loads it issues.
template <class Cfg>
__device__ __forceinline__ int kv_load_rank() {
  return DecodeTraits<Cfg>::kCluster > 1 ? int(cute::block_rank_in_cluster()) : 0;
}

// tma = tile / tile3 / tile9: one box (64 channels, kBN rows, kPartChunks chunks) per part lands the [chunk][row][64]
// layout of its chunks (tile: one part, the whole stage), each part on its own full barrier; in a cluster the CTAs
// take turns by tile. `page`: the block-table entry of the page that holds tokens [tok0, tok0 + kBN).
template <class Cfg, class Smem>
__device__ __forceinline__ void load_tile(const CUtensorMap* tmap, Smem& s, int stage, int hk, int tok0, int page) {
  using T = DecodeTraits<Cfg>;
  constexpr int kBN = T::kBN, kPage = T::kPage;
  constexpr int kParts = T::kTileParts, kPartChunks = T::kPartChunks;
  const uint64_t hint = kv_load_hint<Cfg>();
  const int rank = kv_load_rank<Cfg>();
  const bool issuer = T::kCluster == 1 || (tok0 / kBN) % T::kCluster == rank;
  CUTE_UNROLL
  for (int g = 0; g < kParts; ++g) {
    uint64_t* bar = full_bar<Cfg>(s, stage, g);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, kPartChunks * T::kBoxBytes);
    if (!issuer) continue;
    typename T::Element* dst = s.k[stage] + g * kPartChunks * (kBN * 64);
    if constexpr (T::kCluster == 1) {
      SM90_TMA_LOAD_5D::copy(tmap, bar, hint, dst, 0, tok0 % kPage, g * kPartChunks, hk, page);
    } else {
      SM90_TMA_LOAD_MULTICAST_5D::copy(tmap, bar, uint16_t((1u << T::kCluster) - 1), hint, dst,
                                       0, tok0 % kPage, g * kPartChunks, hk, page);
    }
  }
}

// Issue the TMA copies of one stage: tokens [tok0, tok0 + kBN) of request `req`, kv head `hk`.
// Boxes past the sequence end are skipped (their rows are zeroed after arrival).
template <class Cfg, class Smem>
__device__ __forceinline__ void load_stage(const CUtensorMap* tmap, const FmlaParams& p, Smem& s,
                                           int stage, int req, int hk, int tok0, int seqlen) {
  using T = DecodeTraits<Cfg>;
  constexpr int kBN = T::kBN, kPage = T::kPage, kBoxRows = T::kBoxRows, kChunks = T::kChunks, kBoxCh = T::kBoxCh;
  constexpr uint32_t kBoxBytes = T::kBoxBytes;
  const int valid = min(kBN, seqlen - tok0);
  const int boxes = (valid + kBoxRows - 1) / kBoxRows;
  const int32_t* bt = p.block_table + int64_t(req) * p.block_table_stride;
  if constexpr (T::kTmaTile) {
    load_tile<Cfg>(tmap, s, stage, hk, tok0, bt[tok0 / kPage]);
    return;
  }
  const uint64_t hint = kv_load_hint<Cfg>();
  // In a cluster every CTA expects the whole tile (above) and issues every kCluster-th box, multicast into the
  // same offsets of all the cluster's CTAs (and their full barriers).
  const int rank = kv_load_rank<Cfg>();
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.full[stage], boxes * kChunks * kBoxBytes);
  for (int j = 0; j < boxes; ++j) {
    const int tok = tok0 + j * kBoxRows;
    const int page = bt[tok / kPage];
    const int row = tok % kPage;
    // Rolled: each TMA issue from one thread compiles to a uniform-register loop of ~20 instructions,
    // and this function is inlined at every refill site (cold code at small batch).
    #pragma unroll 1
    for (int c = 0; c < kChunks; ++c) {
      void* dst;
      if constexpr (T::kKvFp8) dst = s.k8[stage] + c * (kBN * kBoxCh) + j * (kBoxRows * kBoxCh);
      else dst = s.k[stage] + c * (kBN * 64) + j * (kBoxRows * 64);
      if constexpr (T::kCluster == 1) {
        SM90_TMA_LOAD_4D::copy(tmap, &s.full[stage], hint, dst, c * kBoxCh, hk, row, page);
      } else if ((j * kChunks + c) % T::kCluster == rank) {
        SM90_TMA_LOAD_MULTICAST_4D::copy(tmap, &s.full[stage], uint16_t((1u << T::kCluster) - 1), hint, dst,
                                         c * kBoxCh, hk, row, page);
      }
    }
  }
}


// Widen a stored fp8 tile (stage `stage` of the ring) into the bf16 K tile s.k[0]. A warp takes four rows at a
// time, a lane one 8-channel piece (8 bytes in, one 16-byte bf16 unit out) of each of the row's nine 64-channel
// chunks: per thread the row and the unit's place in the 128-byte swizzle (unit ^ row % 8) are computed once,
// every chunk is a compile-time offset from them. Reads (half-warps over two rows) and writes (eight lanes over
// one row's eight units) are free of bank conflicts. Rows past `valid` (NaN-poisoned page tails, stale data)
// become zeros. The caller fences and synchronises before the wgmmas read the tile. kWorkers threads (ids `tid`
// 0..kWorkers-1) share the work; the tile goes to bf16 buffer `buf`.
template <class Cfg, int kWorkers = DecodeTraits<Cfg>::kThreads, class Smem>
__device__ __forceinline__ void widen_fp8_tile(Smem& s, int stage, int valid, int tid, int buf = 0) {
  using T = DecodeTraits<Cfg>;
  constexpr int kWarps = kWorkers / 32, kBoxCh = T::kBoxCh, kBN = T::kBN, kD = T::kD;
  const int lane = tid % 32, u = lane % 8;
  const uint8_t* k8 = s.k8[stage];
  char* kb = reinterpret_cast<char*>(s.k[buf]);
  #pragma unroll 1
  for (int quad = tid / 32; quad < kBN / 4; quad += kWarps) {
    const int r = quad * 4 + lane / 8;
    const uint8_t* src = k8 + r * kBoxCh + u * 8;
    char* dst = kb + r * 128 + ((u ^ (r % 8)) << 4);
    const bool live = r < valid;
    CUTE_UNROLL
    for (int c = 0; c < kD / 64; ++c) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (live)
        v = e4m3x8_to_bf16x8(*reinterpret_cast<const uint2*>(src + (c * 64 / kBoxCh) * (kBN * kBoxCh) +
                                                             (c * 64) % kBoxCh));
      *reinterpret_cast<uint4*>(dst + c * (kBN * 128)) = v;
    }
  }
}

// Softmax of tile t of the full_wg schedules (acc_s complete): mask, new row maxima, alpha, P into the
// stage's rope chunk, alpha into shared memory; then publish both to warpgroup 1.
// rP receives P in the accumulator's layout (the pv = regs schedule reads it as its P V operand).
template <class Cfg, class AccS, class CoordS, class MmaSType, class Smem, class RegP>
__device__ __forceinline__ void softmax_tile(const int t, AccS& acc_s, CoordS const& cS, MmaSType const& mma_s,
                                             Smem& s, int iter, int tok_lo, int tok_hi,
                                             const int (&limit)[2], int r0, int wtid, float scale_log2,
                                             float (&m_run)[2], float (&l_run)[2], float (&alpha)[2], RegP& rP) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  using SmemLayoutK = typename T::SmemLayoutK;
  using SmemLayoutP = typename T::SmemLayoutP;
  constexpr int kDV = T::kDV, kBN = T::kBN, kStages = T::kStages;
  warpgroup_fence_operand(acc_s);
  const int st = (iter + t) % kStages;
  const int tok0 = tok_lo + t * kBN;
  float mx[2] = {-INFINITY, -INFINITY};
  const bool need_mask = tok0 + kBN > min(limit[0], limit[1]);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const int h = (get<0>(cS(i)) - r0) >= 8;
    if (need_mask && tok0 + get<1>(cS(i)) >= limit[h]) acc_s(i) = -INFINITY;
    mx[h] = fmaxf(mx[h], acc_s(i));
  }
  float base[2];
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const float m = fmaxf(m_run[h], quad_max(mx[h]));
    base[h] = m == -INFINITY ? 0.f : m * scale_log2;
    alpha[h] = m_run[h] == -INFINITY ? 0.f : exp2f(m_run[h] * scale_log2 - base[h]);
    m_run[h] = m;
  }
  static_assert(size(RegP{}) == size(AccS{}), "P has the accumulator's shape");
  float rs[2] = {0.f, 0.f};
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const int h = (get<0>(cS(i)) - r0) >= 8;
    // The row sum stays in fp32 (lse needs it exact); only the P V operand is rounded.
    const float pr = exp2f(acc_s(i) * scale_log2 - base[h]);
    rs[h] += pr;
    rP(i) = Element(pr);
  }
  {
    // P to shared memory with stmatrix: four 8x8 tiles per instruction, 32-bit shared addresses.
    auto p_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_s);
    auto thr_pc = p_copy.get_thread_slice(wtid);
    Tensor tPsP = thr_pc.partition_D(make_tensor(make_smem_ptr(p_tile<Cfg>(s, st)), SmemLayoutP{}));
    cute::copy(p_copy, thr_pc.retile_S(rP), tPsP);
  }
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    l_run[h] = l_run[h] * alpha[h] + rs[h];
    if ((wtid & 3) == 0) s.alpha[st][r0 + 8 * h] = alpha[h];
  }
  const int valid = tok_hi - tok0;          // tokens of this tile inside the sequence
  if (valid <= kBN) {
    // The request's last tile: its row sums are final. 1 / sum goes to warpgroup 1 with this tile's P, under
    // the same P-ready barrier (no extra synchronisation, and the stage is not rewritten before warpgroup 1
    // has released it).
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float l = quad_sum(l_run[h]);
      if ((wtid & 3) == 0) s.row_inv[st][r0 + 8 * h] = l > 0.f ? 1.f / l : 0.f;
    }
  }
  if (valid < kBN) {
    // V rows past the sequence end hold NaN-poisoned page tails or stale data: zero them (channels
    // 0..511; the rope chunk now holds P) so that 0-probability columns cannot turn P V into NaN.
    Tensor sK = make_tensor(make_smem_ptr(s.k[st]), SmemLayoutK{});
    for (int idx = wtid; idx < (kBN - valid) * (kDV / 8); idx += 128) {
      const int r = valid + idx / (kDV / 8), c8 = (idx % (kDV / 8)) * 8;
      *reinterpret_cast<uint4*>(&sK(r, c8)) = make_uint4(0, 0, 0, 0);
    }
  }
  cutlass::arch::fence_view_async_shared();   // generic-proxy stores -> wgmma (async proxy) reads
  // (wg1_pv = with_softmax: the caller arrives later, once Q K^T of the next tile is done)
  if constexpr (!DecodeTraits<Cfg>::kPvBehindQk) cutlass::arch::ClusterBarrier::arrive(&s.pready[st]);
  // Every P store (pv = smem) and V-tail zero of this warpgroup before its own P V reads them from shared memory.
  // With P from registers only the zeroed V rows of a request's last tile need it (valid is warpgroup-uniform).
  if constexpr (!DecodeTraits<Cfg>::kQreg) {
    if (!DecodeTraits<Cfg>::kPvRegs || valid < kBN) cutlass::arch::NamedBarrier::sync(128, 0);
  }
}

// What a CTA reads before its first request (after the programmatic-dependent-launch wait, where the merge path
// uses it): its partition's row of the tile schedule and the logits' scales.
struct CtaStart {
  int begin_req, begin_block, end_req, end_block, begin_split;
  float kv_scale;                         // fp8: the dequantisation scale (multiplies the logits and the output)
  float qk_scale, scale_log2;             // the logits' scale, natural and base-2 units
};

template <class Cfg>
__device__ __forceinline__ CtaStart cta_start(const CUtensorMap& tmap_k, const FmlaParams& p) {
  if (threadIdx.x == 0) cute::prefetch_tma_descriptor(&tmap_k);   // a kernel parameter: no dependency
  if constexpr (Cfg::kMerge == Merge::kWidePdl) {
    // Programmatic dependent launch: this CTA may start while the previous kernel of the stream finishes.
    // Nothing it reads may be touched before the wait; the merge kernel behind may launch from here on
    // (it waits for this grid's completion before reading any partial).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
  }
  CtaStart c;
  c.kv_scale = 1.f;
  if constexpr (DecodeTraits<Cfg>::kKvFp8) c.kv_scale = p.k_scale_value * (p.k_scale != nullptr ? *p.k_scale : 1.f);
  c.qk_scale = p.scale * c.kv_scale;
  c.scale_log2 = c.qk_scale * 1.4426950408889634f;
  const int* meta = p.metadata + blockIdx.x * kMetadataSize;
  c.begin_req = meta[0];
  c.begin_block = meta[1];
  c.end_req = meta[2];
  c.end_block = meta[3];
  c.begin_split = meta[4];
  return c;
}

// Request `req`'s share of this partition: its length, the token range, the tiles, and where split partials go.
struct RequestSpan {
  int seqlen, tok_lo, tok_hi, n_iter, n_splits, slot;
};

// kFromRow: the first request's length and num_splits entries come from the schedule row's columns 5..7 (read
// again here, from L1, rather than held in registers through the request loop): no second dependent round trip to
// memory at the CTA's start. The qreg schedules (compute-bound, a CTA start is a small share of their time; their
// warpgroup 0 is at its register cap) read cache_seqlens and num_splits.
template <class Cfg, bool kFromRow = !DecodeTraits<Cfg>::kQreg>
__device__ __forceinline__ RequestSpan request_span(const FmlaParams& p, const CtaStart& c, int req) {
  constexpr int kSchedBlock = DecodeTraits<Cfg>::kSchedBlock, kBN = DecodeTraits<Cfg>::kBN;
  RequestSpan r;
  const bool first = req == c.begin_req;        // this partition's first piece: from begin_block, split begin_split
  const bool from_row = kFromRow && first;
  const int* meta = p.metadata + blockIdx.x * kMetadataSize;
  r.seqlen = from_row ? meta[5] : max(p.cache_seqlens[req], 0);
  const int blk_lo = first ? c.begin_block : 0;
  const int blk_hi = req == c.end_req ? c.end_block : (r.seqlen + kSchedBlock - 1) / kSchedBlock;
  r.tok_lo = blk_lo * kSchedBlock;
  r.tok_hi = min(blk_hi * kSchedBlock, r.seqlen);
  r.n_iter = r.tok_hi > r.tok_lo ? (r.tok_hi - r.tok_lo + kBN - 1) / kBN : 0;
  const int slot0 = from_row ? meta[6] : p.num_splits[req];
  r.n_splits = from_row ? meta[7] : p.num_splits[req + 1] - slot0;
  r.slot = slot0 + (first ? c.begin_split : 0);
  return r;
}

// Row rr of a (request, kv head)'s q rows (query position rr / groups, head hk * groups + rr % groups): its first
// element, from the request's q.
template <class Element>
__device__ __forceinline__ const Element* q_row(const FmlaParams& p, int req, int rr, int groups, int hk) {
  return static_cast<const Element*>(p.q) + req * p.q_batch_stride + (rr / groups) * p.q_seq_stride +
         (hk * groups + rr % groups) * p.q_head_stride;
}

// The block-table entry of the first page a request's piece reads, into L2 (a prefetch never faults, so an entry
// past the table's end is harmless). Both Q paths issue it at a request's start.
template <class Cfg>
__device__ __forceinline__ void prefetch_first_page(const FmlaParams& p, const CtaStart& c, int req) {
  using T = DecodeTraits<Cfg>;
  const int32_t* bt = p.block_table + int64_t(req) * p.block_table_stride +
                      (req == c.begin_req ? c.begin_block : 0) * T::kSchedBlock / T::kPage;
  asm volatile("prefetch.global.L2 [%0];" :: "l"(bt));
}

// The start of a request: its first block-table entry into L2, and the Q tile (rows mb * kBM .. + kBM - 1 of this
// (request, kv head), channels kC0..575 into sQ's columns 0..; padding rows zero-filled) by cp.async, every 16-byte
// piece in flight at once (a blocking load per piece would chain ~18 DRAM round trips per thread before the first
// wgmma). Issued after the request's own loads (request_span): behind Q's pieces they waited ~2 us at a CTA's start
// (H100 timeline, bench/timeline.py). One warp per row (the row's head and query position computed once), lanes
// over its pieces. kWorkers threads (ids `tid`) take part. The caller waits (cp.async.wait_all) and synchronises.
template <class Cfg, int kC0 = 0, int kWorkers = DecodeTraits<Cfg>::kThreads, class TensorQ>
__device__ __forceinline__ void start_request(const FmlaParams& p, const CtaStart& c, TensorQ& sQ, int req, int hk,
                                              int mb, int groups, int rows, int tid = threadIdx.x) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  constexpr int kBM = T::kBM, kD = T::kD;
  if (tid == 0) prefetch_first_page<Cfg>(p, c, req);
  #pragma unroll 1
  for (int r = tid / 32; r < kBM; r += kWorkers / 32) {
    const int rr = mb * kBM + r;
    const bool valid = rr < rows;
    const Element* src = valid ? q_row<Element>(p, req, rr, groups, hk) : static_cast<const Element*>(p.q);
    CUTE_UNROLL
    for (int c8 = kC0 + (tid % 32) * 8; c8 < kD; c8 += 32 * 8) {
      const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(&sQ(r, c8 - kC0)));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(dst), "l"(src + c8), "r"(valid ? 16 : 0));
    }
  }
}

// The start of a request with Q by TMA (the nsplit and full_wg schedules, where launch.cuh could describe q with a
// tensor map: make_q_tensor_map), issued by one thread: its first block-table entry into L2, then the Q tile as nine
// 64-channel boxes onto s.qfull. A box covers the tile's rows as (query position, head) = (sq0 + i, head0 + j),
// row = i * box heads + j; rows past s_q lie outside the tensor and land as zeros. The TMA unit keeps the whole tile
// in flight: the same tile by cp.async (start_request) left its issuing threads waiting ~2 us at a CTA's start on
// the H100 (bench/timeline.py), its pieces held back by the SM's outstanding-miss limit.
template <class Cfg, class Smem>
__device__ __forceinline__ void start_request_tma(const CUtensorMap* tmap_q, const FmlaParams& p, const CtaStart& c,
                                                  Smem& s, int req, int hk, int mb, int groups) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  constexpr int kBM = T::kBM, kD = T::kD;
  prefetch_first_page<Cfg>(p, c, req);
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.qfull, uint32_t(kBM * kD * sizeof(Element)));
  const int row0 = mb * kBM;
  const int head0 = hk * groups + row0 % groups, sq0 = row0 / groups;
  #pragma unroll 1
  for (int ch = 0; ch < kD / 64; ++ch)
    SM90_TMA_LOAD_4D::copy(tmap_q, &s.qfull, uint64_t(TMA::CacheHintSm90::EVICT_NORMAL), s.q + ch * (kBM * 64),
                           ch * 64, head0, sq0, req);
}

// Tokens valid..kBN-1 of a bf16 / fp16 tile hold NaN-poisoned page tails or stale data: zero them (all threads) so
// that 0-probability columns cannot turn P V into NaN. The caller fences and synchronises.
template <class Cfg, class TensorK>
__device__ __forceinline__ void zero_tail(TensorK& sK, int valid) {
  using T = DecodeTraits<Cfg>;
  constexpr int kD = T::kD;
  for (int idx = threadIdx.x; idx < (T::kBN - valid) * (kD / 8); idx += T::kThreads) {
    const int r = valid + idx / (kD / 8), c8 = (idx % (kD / 8)) * 8;
    *reinterpret_cast<uint4*>(&sK(r, c8)) = make_uint4(0, 0, 0, 0);
  }
}

// The nsplit and swapped schedules' start of a request: the ring's first tiles (all stages are free: the previous
// request ended on a barrier), then the wait for the request's Q tile; every thread synchronises.
template <class Cfg, class Smem>
__device__ __forceinline__ void fill_ring(const CUtensorMap* tmap, const FmlaParams& p, Smem& s, int iter, int req,
                                          int hk, const RequestSpan& span) {
  constexpr int kStages = DecodeTraits<Cfg>::kStages, kBN = DecodeTraits<Cfg>::kBN;
  if (threadIdx.x == 0) {
    for (int j = 0; j < min(span.n_iter, kStages); ++j)
      load_stage<Cfg>(tmap, p, s, (iter + j) % kStages, req, hk, span.tok_lo + j * kBN, span.seqlen);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}

// A landed tile (stage `stage`, tile j of the request) made ready for the wgmmas of the nsplit and swapped
// schedules: a float8 tile is widened into sK and its stored stage refilled at once with the tile kStages ahead;
// a short bf16 / fp16 tile has its tail zeroed. Either way every thread fences and synchronises.
template <class Cfg, class Smem, class TensorK>
__device__ __forceinline__ void prepare_tile(const CUtensorMap* tmap, const FmlaParams& p, Smem& s, TensorK& sK,
                                             int stage, int j, int req, int hk, int tok0, const RequestSpan& span) {
  using T = DecodeTraits<Cfg>;
  constexpr int kStages = T::kStages, kBN = T::kBN;
  const int valid = span.tok_hi - tok0;           // tokens of this tile inside the sequence
  if constexpr (T::kKvFp8) {
    widen_fp8_tile<Cfg>(s, stage, valid, threadIdx.x);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (threadIdx.x == 0 && j + kStages < span.n_iter)   // a whole tile earlier than the bf16 ring can
      load_stage<Cfg>(tmap, p, s, stage, req, hk, tok0 + kStages * kBN, span.seqlen);
  } else if (valid < kBN) {
    zero_tail<Cfg>(sK, valid);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
  }
}

// Where a (request, kv head, row block)'s output goes: the final tensors, or its split slot's partials.
struct OutRows {
  int req, slot;
  bool is_split;
  int mb, hk, groups, rows;
  // Row rr's channel 0 in o_accum (a split's partial) or out.
  __device__ __forceinline__ int64_t o_offset(const FmlaParams& p, int rr) const {
    return is_split ? ((int64_t(slot) * p.h_kv + hk) * rows + rr) * kHeadDimV
                    : ((int64_t(req) * p.s_q + rr / groups) * p.h_q + hk * groups + rr % groups) * kHeadDimV;
  }
  // Row rr's entry in lse_accum or lse.
  __device__ __forceinline__ int64_t lse_offset(const FmlaParams& p, int rr) const {
    return is_split ? (int64_t(slot) * p.h_kv + hk) * rows + rr
                    : (int64_t(req) * p.h_q + hk * groups + rr % groups) * p.s_q + rr / groups;
  }
};

// A warpgroup's output accumulator (rows r0 and r0 + 8 of the row block, channels c_base + ...) times the rows'
// 1 / sum. Each thread holds, per 8-column group, two adjacent columns; row addresses are formed once and every
// store is its row pointer plus a compile-time offset. (Written per element, the address arithmetic and row
// checks made this ~3000 instructions that each CTA runs once: at small batch the kernel waited on instruction
// fetch more than on anything else.)
template <class Cfg, class AccO, class CoordO>
__device__ __forceinline__ void store_o(const FmlaParams& p, const OutRows& o, AccO const& acc_o, CoordO const& cO,
                                        int r0, int c_base, const float (&inv)[2]) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  constexpr int kDV = T::kDV, kBM = T::kBM;
  const int c0 = c_base + get<1>(cO(0));
  int64_t row_off[2];
  bool row_ok[2];
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int rr = o.mb * kBM + r0 + 8 * h;
    row_ok[h] = rr < o.rows;
    row_off[h] = o.o_offset(p, rr) + c0;
  }
  if (o.is_split) {
    float* dst[2] = {p.o_accum + row_off[0], p.o_accum + row_off[1]};
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int h = (get<0>(cO(i)) - r0) >= 8;
      const int dc = get<1>(cO(i)) - get<1>(cO(0));     // compile-time
      if (row_ok[h])
        *reinterpret_cast<float2*>(dst[h] + dc) = make_float2(acc_o(i) * inv[h], acc_o(i + 1) * inv[h]);
    }
  } else {
    Element* dst[2] = {static_cast<Element*>(p.out) + row_off[0], static_cast<Element*>(p.out) + row_off[1]};
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int h = (get<0>(cO(i)) - r0) >= 8;
      const int dc = get<1>(cO(i)) - get<1>(cO(0));
      Element pair[2] = {Element(acc_o(i) * inv[h]), Element(acc_o(i + 1) * inv[h])};
      if (row_ok[h]) *reinterpret_cast<uint32_t*>(dst[h] + dc) = *reinterpret_cast<uint32_t*>(pair);
    }
  }
}

// The lse of rows r0 and r0 + 8 (one lane per quad of the warpgroup that holds the row statistics writes).
template <class Cfg>
__device__ __forceinline__ void store_lse(const FmlaParams& p, const OutRows& o, int r0, int wtid,
                                          const float (&lse)[2]) {
  if ((wtid & 3) != 0) return;
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int rr = o.mb * DecodeTraits<Cfg>::kBM + r0 + 8 * h;
    if (rr < o.rows) (o.is_split ? p.lse_accum : p.lse)[o.lse_offset(p, rr)] = lse[h];
  }
}

// The producer warpgroup of full_wg with Cfg::kProducerWg (threads kNWG * 128 ..): its first thread issues every KV
// load of the CTA's whole work list, each stage refilled the moment both consumer warpgroups released it (the page's
// block-table entry is read before that wait). At a request's start it loads the request's first tile, then (from
// the second request on) waits for warpgroup 0 to be done with the Q tile of the request before (qempty) and loads
// the new one onto qfull: by TMA, or where launch.cuh could not describe q, by cp.async from the whole warpgroup.
// The consumers meanwhile finish and store the request before, so the ring does not drain at the boundary.
template <class Cfg, class Smem, class TensorQ>
__device__ __forceinline__ void produce_full_wg(const CUtensorMap& tmap_k, const CUtensorMap& tmap_q,
                                                const FmlaParams& p, const CtaStart& cs, Smem& s, TensorQ& sQ,
                                                int q_tma, int hk, int mb, int groups, int rows) {
  using T = DecodeTraits<Cfg>;
  constexpr int kStages = T::kStages, kBN = T::kBN, kPage = T::kPage;
  const int ptid = threadIdx.x - T::kConsumerThreads;
  int iter = 0;                                   // global stage counter, as the consumers count it
  for (int req = cs.begin_req; req <= cs.end_req; ++req) {
    const RequestSpan span = request_span<Cfg>(p, cs, req);
    const int32_t* bt = p.block_table + int64_t(req) * p.block_table_stride;
    // Tile j of the request into its stage, once the stage's previous tile was released.
    auto produce = [&](int j) {
      const int it = iter + j, st = it % kStages, tok0 = span.tok_lo + j * kBN;
      const int page = bt[tok0 / kPage];
      if (it >= kStages) cutlass::arch::ClusterBarrier::wait(&s.empty[st], (it / kStages - 1) & 1);
      load_tile<Cfg>(&tmap_k, s, st, hk, tok0, page);
    };
    if (ptid == 0 && span.n_iter > 0) produce(0);   // its stage was freed before warpgroup 0 is done with Q
    if (req > cs.begin_req) cutlass::arch::ClusterBarrier::wait(&s.qempty, (req - cs.begin_req - 1) & 1);
    if (q_tma) {
      if (ptid == 0) start_request_tma<Cfg>(&tmap_q, p, cs, s, req, hk, mb, groups);
    } else {
      start_request<Cfg, 0, 128>(p, cs, sQ, req, hk, mb, groups, rows, ptid);
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      cutlass::arch::fence_view_async_shared();   // generic-proxy writes -> wgmma (async proxy) reads
      cutlass::arch::NamedBarrier::sync(128, 1);
      if (ptid == 0) cutlass::arch::ClusterBarrier::arrive(&s.qfull);
    }
    if (ptid == 0) {
      for (int j = 1; j < span.n_iter; ++j) produce(j);
    }
    iter += span.n_iter;
  }
}

// The nsplit and full_wg schedules (the swapped one is in decode_swap.cuh).
template <class Cfg>
__device__ __forceinline__ void decode_tiles(const CUtensorMap& tmap_k, const CUtensorMap& tmap_q, const FmlaParams& p,
                                             int q_tma) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  using SharedStorage = typename T::SharedStorage;
  using SmemLayoutQ = typename T::SmemLayoutQ;
  using SmemLayoutK = typename T::SmemLayoutK;
  using SmemLayoutVt = typename T::SmemLayoutVt;
  using SmemLayoutP = typename T::SmemLayoutP;
  using MmaS = typename T::MmaS;
  using MmaO = typename T::MmaO;
  constexpr int kD = T::kD, kDV = T::kDV, kBM = T::kBM, kBN = T::kBN, kStages = T::kStages, kNWG = T::kNWG;
  constexpr int kThreads = T::kThreads, kBNw = T::kBNw, kDVw = T::kDVw;
  constexpr int kProducer = T::kProducer;
  constexpr Qk kQk = Cfg::kQk;
  (void)kProducer;                                // the full_wg schedules' producer thread
  extern __shared__ char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(aligned_smem<kNWG>(smem_raw));
  const int tid = threadIdx.x;
  const int wg = cutlass::canonical_warp_group_idx();   // warp-uniform to the compiler
  const int wtid = tid % 128;
  const int hk = blockIdx.y, mb = blockIdx.z;     // blockIdx.x: the partition (cta_start reads its schedule row)
  const int groups = p.h_q / p.h_kv;              // q heads per kv head
  const int rows = p.s_q * groups;                // q rows of one (request, kv head)

  timeline_stamp<false>(0);                       // (trace builds of nsplit only; trace.cuh) entry
  if constexpr (!T::kQTma) q_tma = 0;
  if (q_tma && tid == 0) cute::prefetch_tma_descriptor(&tmap_q);
  const CtaStart cs = cta_start<Cfg>(tmap_k, p);
  const float kv_scale = cs.kv_scale, qk_scale = cs.qk_scale, scale_log2 = cs.scale_log2;
  if (cs.end_req < cs.begin_req) return;          // idle partition
  timeline_stamp<false>(1);                       // schedule row read

  if (tid == 0) {
    CUTE_UNROLL
    for (int st = 0; st < kStages; ++st) {
      CUTE_UNROLL
      for (int g = 0; g < T::kTileParts; ++g) cutlass::arch::ClusterTransactionBarrier::init(full_bar<Cfg>(s, st, g), 1);
      if constexpr (kQk != Qk::kNsplit) {
        cutlass::arch::ClusterBarrier::init(&s.pready[st], 128);
        cutlass::arch::ClusterBarrier::init(&s.empty[st], kEmptyArrivals<Cfg, T::kConsumerThreads>);   // both
      }
    }
    cutlass::arch::ClusterTransactionBarrier::init(&s.qfull, 1);
    if constexpr (T::kProducerWg) cutlass::arch::ClusterBarrier::init(&s.qempty, 128);   // warpgroup 0
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (T::kCluster > 1) cute::cluster_sync();   // the peer's barriers exist before any multicast or arrive
  else __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(s.q), SmemLayoutQ{});
  if constexpr (T::kProducerWg) {
    if (wg == kNWG) {                             // the producer warpgroup: loads only, few registers
      cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegs>();
      produce_full_wg<Cfg>(tmap_k, tmap_q, p, cs, s, sQ, q_tma, hk, mb, groups, rows);
      if constexpr (T::kCluster > 1) cute::cluster_sync();   // as the consumers' last step (below)
      return;
    }
    cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegs>();
  }
  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(wtid);
  auto thr_o = mma_o.get_thread_slice(wtid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  // P of the nsplit schedule (its own buffer; unused by the full_wg ones, which keep P in each stage).
  Tensor sP = make_tensor(make_smem_ptr(p_buffer<Cfg>(s)), SmemLayoutP{});
  Tensor tOrP = thr_o.partition_fragment_A(sP);
  Tensor tPsP = thr_s.partition_C(local_tile(sP, Shape<Int<kBM>, Int<kBNw>>{}, make_coord(0, wg)));

  // Row / column of each accumulator element (rows: 2 per thread, r0 and r0 + 8).
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBNw>>{}));
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kDVw>>{}));
  const int r0 = get<0>(cS(0));

  int iter = 0;                                   // global stage counter: drives mbarrier phases
  for (int req = cs.begin_req; req <= cs.end_req; ++req) {
    const RequestSpan span = request_span<Cfg>(p, cs, req);   // its loads first, ahead of Q's in the queue
    if constexpr (!T::kProducerWg) {              // (the producer warpgroup loads Q itself)
      if (!q_tma) start_request<Cfg>(p, cs, sQ, req, hk, mb, groups, rows);
      else if (tid == 0) start_request_tma<Cfg>(&tmap_q, p, cs, s, req, hk, mb, groups);
    }
    const int q_phase = (req - cs.begin_req) & 1;   // one Q tile per request: the parity of s.qfull's phase
    const int seqlen = span.seqlen, tok_lo = span.tok_lo, tok_hi = span.tok_hi, n_iter = span.n_iter;
    const int n_splits = span.n_splits, slot = span.slot;
    const bool first_req = req == cs.begin_req;
#ifdef FMLA_TIMELINE
    asm volatile("" :: "r"(n_iter), "r"(n_splits), "r"(slot));
    if (first_req) timeline_stamp<false>(2);      // the request's span known, its Q load issued
#endif

    Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBM>, Int<kDVw>>{});
    float inv[2], lse[2];
    if constexpr (kQk == Qk::kNsplit) {
      fill_ring<Cfg>(&tmap_k, p, s, iter, req, hk, span);
      if (q_tma) cutlass::arch::ClusterTransactionBarrier::wait(&s.qfull, q_phase);
      if (first_req) timeline_stamp<false>(3);    // Q landed, the ring's loads issued

      // Per-thread row bookkeeping for rows r0 and r0 + 8.
      int limit[2];
      causal_limits<kBM>(p, mb, r0, groups, rows, seqlen, limit);
      float m_run[2] = {-INFINITY, -INFINITY};
      float l_run[2] = {0.f, 0.f};
      clear(acc_o);

      for (int j = 0; j < n_iter; ++j, ++iter) {
        const int stage = iter % kStages;
        const int tok0 = tok_lo + j * kBN;
        cutlass::arch::ClusterTransactionBarrier::wait(&s.full[stage], (iter / kStages) & 1);
        if (first_req && j == 0) timeline_stamp<false>(4);   // the first tile landed
        const int kbuf = T::kKvFp8 ? 0 : stage;     // the bf16 K tile the wgmmas read
        Tensor sK = make_tensor(make_smem_ptr(s.k[kbuf]), SmemLayoutK{});
        prepare_tile<Cfg>(&tmap_k, p, s, sK, stage, j, req, hk, tok0, span);

        // S = Q K^T for this warpgroup's columns.
        Tensor tSrK = thr_s.partition_fragment_B(local_tile(sK, Shape<Int<kBNw>, Int<kD>>{}, make_coord(wg, 0)));
        Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBNw>>{});
        gemm_ss<false>(mma_s, tSrQ, tSrK, acc_s);

        // Mask and per-row maxima.
        float mx[2] = {-INFINITY, -INFINITY};
        const bool need_mask = tok0 + kBN > min(limit[0], limit[1]);
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) {
          const int h = (get<0>(cS(i)) - r0) >= 8;
          if (need_mask && tok0 + wg * kBNw + get<1>(cS(i)) >= limit[h]) acc_s(i) = -INFINITY;
          mx[h] = fmaxf(mx[h], acc_s(i));
        }
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          mx[h] = quad_max(mx[h]);
          if ((wtid & 3) == 0) s.row_max[wg][r0 + 8 * h] = mx[h];
        }
        __syncthreads();
        float alpha[2], base[2];
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          float m = m_run[h];
          CUTE_UNROLL
          for (int w = 0; w < kNWG; ++w) m = fmaxf(m, s.row_max[w][r0 + 8 * h]);
          base[h] = m == -INFINITY ? 0.f : m * scale_log2;
          alpha[h] = m_run[h] == -INFINITY ? 0.f : exp2f(m_run[h] * scale_log2 - base[h]);
          m_run[h] = m;
        }
        float rs[2] = {0.f, 0.f};
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); i += 2) {
          const int h = (get<0>(cS(i)) - r0) >= 8;
          // The row sum stays in fp32 (lse needs it exact); only the P V operand is rounded. Elements i and
          // i + 1 are adjacent columns of one row: one 32-bit store.
          const float p0 = exp2f(acc_s(i) * scale_log2 - base[h]), p1 = exp2f(acc_s(i + 1) * scale_log2 - base[h]);
          rs[h] += p0 + p1;
          Element pair[2] = {Element(p0), Element(p1)};
          *reinterpret_cast<uint32_t*>(raw_pointer_cast(&tPsP(i))) = *reinterpret_cast<uint32_t*>(pair);
        }
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + rs[h];
        CUTE_UNROLL
        for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= alpha[(get<0>(cO(i)) - r0) >= 8];
        cutlass::arch::fence_view_async_shared();
        __syncthreads();

        // O += P V for this warpgroup's output channels.
        Tensor sVt = make_tensor(make_smem_ptr(s.k[kbuf]), SmemLayoutVt{});
        Tensor tOrV = thr_o.partition_fragment_B(local_tile(sVt, Shape<Int<kDVw>, Int<kBN>>{}, make_coord(wg, 0)));
        gemm_ss<true>(mma_o, tOrP, tOrV, acc_o);
        __syncthreads();                            // stage and P free for reuse

        if (!T::kKvFp8 && tid == 0 && j + kStages < n_iter)
          load_stage<Cfg>(&tmap_k, p, s, stage, req, hk, tok0 + kStages * kBN, seqlen);
      }

      if (first_req) timeline_stamp<false>(5);    // the request's tiles computed
      // Epilogue: full row sums across the quad and the warpgroups.
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const float ls = quad_sum(l_run[h]);
        if ((wtid & 3) == 0) s.row_sum[wg][r0 + 8 * h] = ls;
      }
      __syncthreads();
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        float l = 0.f;
        CUTE_UNROLL
        for (int w = 0; w < kNWG; ++w) l += s.row_sum[w][r0 + 8 * h];
        inv[h] = l > 0.f ? kv_scale / l : 0.f;
        // Empty rows: +inf is the final convention, -inf marks "no mass" in split partials.
        lse[h] = l > 0.f ? m_run[h] * qk_scale + logf(l) : (n_splits > 1 ? -INFINITY : INFINITY);
      }
      __syncthreads();                              // row_sum is rewritten by the next request
    } else {
      if constexpr (T::kProducerWg) {
        // The producer warpgroup has the ring's loads and Q in flight; only warpgroup 0 reads Q.
        if (wg == 0) cutlass::arch::ClusterTransactionBarrier::wait(&s.qfull, q_phase);
      } else {
        // Prologue: the producer fills the ring. A stage is reloaded only after both warpgroups arrived on its
        // empty barrier for the tile it held (at a request boundary those waits pass at once).
        if (tid == kProducer) {
          for (int j = 0; j < min(n_iter, kStages); ++j) {
            const int it = iter + j;
            if (it >= kStages) cutlass::arch::ClusterBarrier::wait(&s.empty[it % kStages], (it / kStages - 1) & 1);
            load_stage<Cfg>(&tmap_k, p, s, it % kStages, req, hk, tok_lo + j * kBN, seqlen);
          }
        }

        asm volatile("cp.async.wait_all;\n" ::: "memory");
        cutlass::arch::fence_view_async_shared();
        __syncthreads();
        if (q_tma) cutlass::arch::ClusterTransactionBarrier::wait(&s.qfull, q_phase);
      }

      clear(acc_o);
      inv[0] = inv[1] = 0.f;
      lse[0] = lse[1] = 0.f;

      // O += P V for tile t, this warpgroup's output channels; issued, not waited.
      auto issue_pv = [&](int t) {
        const int st = (iter + t) % kStages;
        Tensor tOrP = thr_o.partition_fragment_A(make_tensor(make_smem_ptr(p_tile<Cfg>(s, st)), SmemLayoutP{}));
        Tensor sVt = make_tensor(make_smem_ptr(s.k[st]), SmemLayoutVt{});
        Tensor tOrV = thr_o.partition_fragment_B(local_tile(sVt, Shape<Int<kDVw>, Int<kBN>>{}, make_coord(wg, 0)));
        issue_ss<true>(mma_o, tOrP, tOrV, acc_o);
      };
      auto rescale_o = [&](float a0, float a1) {
        if (a0 == 1.f && a1 == 1.f) return;         // row maxima unchanged (most tiles after the first ones)
        CUTE_UNROLL
        for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= (get<0>(cO(i)) - r0) >= 8 ? a1 : a0;
      };

      if (wg == 0) {
        // Row bookkeeping for rows r0 and r0 + 8: the causal limit, running max and sum.
        int limit[2];
        causal_limits<kBM>(p, mb, r0, groups, rows, seqlen, limit);
        float m_run[2] = {-INFINITY, -INFINITY};
        float l_run[2] = {0.f, 0.f};
        float alpha[2] = {1.f, 1.f};
        Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBNw>>{});
        Tensor rP = make_tensor_like<Element>(acc_s);   // P of the current tile, the accumulator's layout
        // pv = regs: this warpgroup's P V reads P from rP, viewed as the register-A fragment of MmaOr (the same
        // registers in the same order: element i of both is (row, column) of one thread's share of the tile).
        typename T::MmaOr mma_or;
        auto thr_or = mma_or.get_thread_slice(wtid);
        Tensor tOrPr = make_tensor(rP.data(), thr_or.partition_fragment_A(
            make_tensor(make_smem_ptr(p_tile<Cfg>(s, 0)), SmemLayoutP{})).layout());
        static_assert(size(tOrPr) == size(rP), "P's register fragments match");
        // O += P V of tile t with P from registers (pv = regs); issued, not waited.
        auto issue_pv_regs = [&](int t) {
          const int st = (iter + t) % kStages;
          Tensor sVt = make_tensor(make_smem_ptr(s.k[st]), SmemLayoutVt{});
          Tensor tOrV = thr_or.partition_fragment_B(local_tile(sVt, Shape<Int<kDVw>, Int<kBN>>{}, make_coord(0, 0)));
          warpgroup_fence_operand(tOrPr);
          issue_ss<true>(mma_or, tOrPr, tOrV, acc_o);
          warpgroup_fence_operand(tOrPr);
        };
        auto issue_pv0 = [&](int t) {
          if constexpr (T::kPvRegs) issue_pv_regs(t);
          else issue_pv(t);
        };

        // S = Q K^T for tile t, all kBN columns; waits for the tile's bytes, issues, does not wait.
        auto issue_qk = [&](int t) {
          const int it = iter + t, st = it % kStages;
          cutlass::arch::ClusterTransactionBarrier::wait(full_bar<Cfg>(s, st), (it / kStages) & 1);
          Tensor tSrK = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(s.k[st]), SmemLayoutK{}));
          // Q's descriptors are rebuilt from an opaque pointer per tile: otherwise all 36 are hoisted out of the
          // tile loop and shuffled between uniform and vector registers (~250 moves per tile).
          Tensor tSrQ = thr_s.partition_fragment_A(make_tensor(make_smem_ptr(opaque_ptr(s.q)), SmemLayoutQ{}));
          issue_ss<false>(mma_s, tSrQ, tSrK, acc_s, WaitTilePart<Cfg, SharedStorage>{s, it});
        };

        // The last tile is peeled off so that no wgmma sits in a branch with a different wait (ptxas would
        // serialise every wgmma of the kernel), and acc_o is rescaled before the first wgmma of each batch
        // (touching an accumulator of an in-flight batch serialises too).
        // producer warpgroup: Q is free for the next request once the last Q K^T of this one is done
        auto q_done = [&](int t) {
          if constexpr (T::kProducerWg) {
            if (t == n_iter - 1) cutlass::arch::ClusterBarrier::arrive(&s.qempty);
          }
        };
        if constexpr (T::kProducerWg) {
          if (n_iter == 0) cutlass::arch::ClusterBarrier::arrive(&s.qempty);
        }
        if (n_iter > 0) {
          issue_qk(0);
          warpgroup_wait<0>();
          q_done(0);
          softmax_tile<Cfg>(0, acc_s, cS, mma_s, s, iter, tok_lo, tok_hi, limit, r0, wtid, scale_log2, m_run, l_run,
                            alpha, rP);
        }
        for (int j = 0; j + 1 < n_iter; ++j) {
          const int st = (iter + j) % kStages;
          rescale_o(alpha[0], alpha[1]);
          if constexpr (kQk == Qk::kFullWgAhead) {
            issue_qk(j + 1);                          // tensor cores: QK(j+1), then PV(j) behind it
            issue_pv(j);
            warpgroup_wait<1>();                      // QK(j+1) done; its softmax overlaps PV(j)
            softmax_tile<Cfg>(j + 1, acc_s, cS, mma_s, s, iter, tok_lo, tok_hi, limit, r0, wtid, scale_log2, m_run,
                              l_run, alpha, rP);
            warpgroup_wait<0>();
            warpgroup_fence_operand(acc_o);
            release_stage<Cfg>(s, st);
          } else {
            issue_pv0(j);
            if constexpr (T::kReleaseEarly) {
              warpgroup_wait<0>();                    // PV(j) done: release the stage before waiting for tile j+1
              warpgroup_fence_operand(acc_o);
              release_stage<Cfg>(s, st);
              issue_qk(j + 1);
            } else {
              issue_qk(j + 1);                        // waits for tile j+1's bytes while PV(j) runs
              warpgroup_wait<1>();                    // PV(j) done: release the stage at once
              warpgroup_fence_operand(acc_o);
              release_stage<Cfg>(s, st);
            }
            warpgroup_wait<0>();
            q_done(j + 1);
            // wg1_pv = with_softmax: P(j) to warpgroup 1 now, so its P V(j) overlaps the softmax of tile j+1
            if constexpr (T::kPvBehindQk) cutlass::arch::ClusterBarrier::arrive(&s.pready[st]);
            softmax_tile<Cfg>(j + 1, acc_s, cS, mma_s, s, iter, tok_lo, tok_hi, limit, r0, wtid, scale_log2, m_run,
                              l_run, alpha, rP);
          }
        }
        if (n_iter > 0) {
          if constexpr (T::kPvBehindQk) cutlass::arch::ClusterBarrier::arrive(&s.pready[(iter + n_iter - 1) % kStages]);
          rescale_o(alpha[0], alpha[1]);
          issue_pv0(n_iter - 1);
          warpgroup_wait<0>();
          warpgroup_fence_operand(acc_o);
          release_stage<Cfg>(s, (iter + n_iter - 1) % kStages);
        }

        // Full row sums across the quad (warpgroup 1 got 1 / sum with the last tile's P).
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const float l = quad_sum(l_run[h]);
          inv[h] = l > 0.f ? 1.f / l : 0.f;
          // Empty rows: +inf is the final convention, -inf marks "no mass" in split partials.
          lse[h] = l > 0.f ? m_run[h] * qk_scale + logf(l) : (n_splits > 1 ? -INFINITY : INFINITY);
        }
      } else {
        for (int j = 0; j < n_iter; ++j) {
          const int it = iter + j, st = it % kStages;
          cutlass::arch::ClusterBarrier::wait(&s.pready[st], (it / kStages) & 1);
          rescale_o(s.alpha[st][r0], s.alpha[st][r0 + 8]);
          if (j + 1 == n_iter) {                    // the last tile: 1 / row sum came with it
            inv[0] = s.row_inv[st][r0];
            inv[1] = s.row_inv[st][r0 + 8];
          }
          issue_pv(j);
          warpgroup_wait<0>();
          warpgroup_fence_operand(acc_o);
          release_stage<Cfg>(s, st);
          if (!T::kProducerWg && tid == kProducer && j + kStages < n_iter) {
            cutlass::arch::ClusterBarrier::wait(&s.empty[st], (it / kStages) & 1);
            load_stage<Cfg>(&tmap_k, p, s, st, req, hk, tok_lo + (j + kStages) * kBN, seqlen);
          }
        }
      }
      iter += n_iter;
      // every wgmma of this request done (Q is rewritten next; producer warpgroup: ordered by qempty instead)
      if constexpr (!T::kProducerWg) __syncthreads();
    }
    const OutRows out{req, slot, n_splits > 1, mb, hk, groups, rows};
    store_o<Cfg>(p, out, acc_o, cO, r0, wg * kDVw, inv);
    if (wg == 0) store_lse<Cfg>(p, out, r0, wtid, lse);
    if (first_req) timeline_stamp<false>(6);      // the request's output stored (issued)
  }
  timeline_stamp<false>(7);                       // every request done
  // No CTA of a cluster exits while its peer may still multicast into it or arrive on its barriers.
  if constexpr (T::kCluster > 1) cute::cluster_sync();
}


}  // namespace fmla

#include "decode_swap.cuh"
#include "decode_qreg.cuh"

namespace fmla {

// tmap_q / q_tma: Q by TMA (nsplit and full_wg schedules, where launch.cuh could describe q; q_tma = 0: cp.async).
template <class Cfg>
__global__ void __launch_bounds__(DecodeTraits<Cfg>::kThreads, 1)
decode_kernel(const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_q,
              const __grid_constant__ FmlaParams p, int q_tma) {
  if constexpr (Cfg::kQk == Qk::kSwap) decode_swap_tiles<Cfg>(tmap_k, p);
  else if constexpr (DecodeTraits<Cfg>::kQreg) decode_qreg_tiles<Cfg>(tmap_k, p);
  else decode_tiles<Cfg>(tmap_k, tmap_q, p, q_tma);
}

}  // namespace fmla
