// Tensor-core rate of the qreg schedule's two GEMMs in isolation, on one 64-token tile resident in shared memory
// (no loads, no softmax, no barriers between iterations): how close each gets to the peak when nothing else runs.
//   P V : O (64 x 256 per warpgroup) += P (64 x 64, shared memory) V (the MN-major view of the K tile's 256-channel
//         half), shared-memory operands, as warpgroups 1 and 2 of decode_qreg.cuh issue it (MmaO);
//   the same with P from registers (register-A wgmma, as FA3's and FlashMLA's own-half P V);
//   Q K^T: S (64 x 64) = Q K^T over 576 channels, 384 of Q from registers and 192 from shared memory (warpgroup 0's
//         MmaQn + MmaQr).
// Every CTA (one per SM) runs `iters` tiles per warpgroup and thread 0 of each warpgroup records clock64() around
// them. Printed: cycles per tile and the fraction of the peak (1024 dense bf16 FLOP / clock / SM partition: a
// 64 x 256 x 64 P V is 512 cycles for one warpgroup alone, 1024 for two sharing the SM; Q K^T 64 x 64 x 576 is 1152).
// Build and run (bench/device_peers.sh step probe):
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I templates \
//        -I $CUTLASS/include [-I $CUDA/include/cccl] bench/probe_wgmma.cu -o probe && ./probe
#include <algorithm>
#include <cstdio>
#include <type_traits>
#include <vector>

extern "C" {
#include "kernels/params.h"
}
#include "kernels/decode_kernel.cuh"

namespace probe {

struct Config {   // the 64-token qreg variant (bf16, page 64, two stages)
  using Element = cutlass::bfloat16_t;
  using KvElement = cutlass::bfloat16_t;
  static constexpr int kBlockN = 64;
  static constexpr int kStages = 2;
  static constexpr int kNumWarpgroups = 3;
  static constexpr int kPageSize = 64;
  static constexpr int kCombineRows = 4;
  static constexpr fmla::Qk kQk = fmla::Qk::kQreg;
  static constexpr int kRowsN = 64;
  static constexpr bool kWidenAhead = false;
  static constexpr int kCluster = 1;
  static constexpr fmla::Merge kMerge = fmla::Merge::kWidePdl;
};

using namespace cute;
using T = fmla::DecodeTraits<Config>;
using Element = T::Element;

// P V on a resident tile, warpgroup `wg` taking the 256-channel half wg % 2 of V; kPRegs: P from registers
// (register-A wgmma), else from shared memory (MmaO, as decode_qreg.cuh). Returns the cycles of `iters` tiles.
template <bool kPRegs>
__device__ long long pv_cycles(Element* k_tile, int wg, int wtid, int wgs, int iters, float& keep) {
  using MmaRs = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Element, Element, float,
      Shape<Int<T::kBM>, Int<T::kDVw>, Int<T::kBN>>, GMMA::Major::K, GMMA::Major::MN>()));
  using Mma = std::conditional_t<kPRegs, MmaRs, T::MmaO>;
  Mma mma;
  auto thr = mma.get_thread_slice(wtid);
  Tensor tOrP = thr.partition_fragment_A(make_tensor(make_smem_ptr(k_tile + (T::kDV / 64) * (T::kBN * 64)),
                                                     T::SmemLayoutP{}));
  if constexpr (kPRegs)
    for (int i = 0; i < size(tOrP); ++i) tOrP(i) = k_tile[i * 131 + wtid];   // data, not constants
  Tensor sVt = make_tensor(make_smem_ptr(k_tile), T::SmemLayoutVt{});
  Tensor tOrV = thr.partition_fragment_B(local_tile(sVt, Shape<Int<T::kDVw>, Int<T::kBN>>{}, make_coord(wg % 2, 0)));
  Tensor acc = partition_fragment_C(mma, Shape<Int<T::kBM>, Int<T::kDVw>>{});
  clear(acc);
  asm volatile("bar.sync 1, %0;" ::"r"(wgs * 128));
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    fmla::issue_ss<true>(mma, tOrP, tOrV, acc);
    warpgroup_wait<0>();
  }
  warpgroup_fence_operand(acc);
  const long long t1 = clock64();
  for (int i = 0; i < size(acc); ++i) keep += acc(i);
  return t1 - t0;
}

// mode 0: P V on `wgs` warpgroups, P from shared memory; mode 2: the same with P from registers;
// mode 1: Q K^T on warpgroup 0 only
__global__ void __launch_bounds__(256, 1) gemm_probe(int mode, int wgs, int iters, long long* cycles, float* sink) {
  extern __shared__ char smem_raw[];
  Element* k_tile = reinterpret_cast<Element*>(fmla::aligned_smem<2>(smem_raw));      // (64 tokens, 576)
  Element* q_rest = k_tile + T::kBN * T::kD;                                            // (64 rows, 192)
  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  for (int i = tid; i < T::kBN * T::kD + T::kBM * (T::kD - fmla::kQregChannels); i += blockDim.x)
    k_tile[i] = Element(float((i * 37) % 17) * 0.01f);
  __syncthreads();
  if (wg >= wgs) return;
  long long taken = 0;                           // cycles of `iters` tiles
  float keep = 0.f;
  if (mode == 0) {
    taken = pv_cycles<false>(k_tile, wg, wtid, wgs, iters, keep);
  } else if (mode == 2) {
    taken = pv_cycles<true>(k_tile, wg, wtid, wgs, iters, keep);
  } else {
    constexpr int kQc = fmla::kQregChannels, kQs = T::kD - fmla::kQregChannels;
    using MmaQn = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Element, Element, float,
        Shape<Int<T::kBM>, Int<T::kBN>, Int<kQc>>>()));
    using MmaQr = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
        Shape<Int<T::kBM>, Int<T::kBN>, Int<kQs>>>()));
    MmaQn mma_qn;
    MmaQr mma_qr;
    auto thr_qn = mma_qn.get_thread_slice(wtid);
    auto thr_qr = mma_qr.get_thread_slice(wtid);
    Tensor tSrQ = thr_qn.partition_fragment_A(make_tensor(make_smem_ptr(q_rest), Shape<Int<T::kBM>, Int<kQc>>{}));
    for (int i = 0; i < size(tSrQ); ++i) tSrQ(i) = k_tile[i * 131 + wtid];   // data, not constants (no rematerialising)
    Tensor sK = make_tensor(make_smem_ptr(k_tile), T::SmemLayoutK{});
    Tensor tSrKn = thr_qn.partition_fragment_B(local_tile(sK, Shape<Int<T::kBN>, Int<kQc>>{}, make_coord(0, 0)));
    Tensor tSrKr = thr_qr.partition_fragment_B(local_tile(sK, Shape<Int<T::kBN>, Int<kQs>>{}, make_coord(0, kQc / kQs)));
    Tensor tSsQr = thr_qr.partition_fragment_A(make_tensor(make_smem_ptr(q_rest), T::SmemLayoutQr{}));
    Tensor acc = partition_fragment_C(mma_qr, Shape<Int<T::kBM>, Int<T::kBN>>{});
    asm volatile("bar.sync 1, 128;");
    const long long t0 = clock64();
    for (int it = 0; it < iters; ++it) {
      fmla::issue_qk_split(mma_qn, tSrQ, tSrKn, mma_qr, tSsQr, tSrKr, acc);
      warpgroup_wait<0>();
      keep += acc(0);
    }
    warpgroup_fence_operand(acc);
    taken = clock64() - t0;
  }
  if (wtid == 0) cycles[blockIdx.x * 2 + wg] = taken;
  if (keep == 12345.f) sink[0] = keep;               // keeps the accumulators alive
}

}  // namespace probe

int main() {
  using probe::T;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int smem = 1024 + (T::kBN * T::kD + T::kBM * (T::kD - fmla::kQregChannels)) * int(sizeof(probe::Element));
  if (cudaFuncSetAttribute(probe::gemm_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    std::printf("cannot set %d B of shared memory\n", smem);
    return 1;
  }
  long long* cycles = nullptr;
  float* sink = nullptr;
  cudaMalloc(&cycles, sizeof(long long) * sms * 2);
  cudaMalloc(&sink, sizeof(float));
  const int iters = 2000;
  struct Case { const char* name; int mode, wgs; double ideal; };
  const Case cases[] = {{"P V, one warpgroup (64x256x64, shared-memory P and V)", 0, 1, 512.0},
                        {"P V, two warpgroups (64x256x64 each, both halves of V)", 0, 2, 1024.0},
                        {"P V, two warpgroups, P from registers (register-A wgmma)", 2, 2, 1024.0},
                        {"Q K^T, one warpgroup (64x64x576, 384 channels of Q from registers)", 1, 1, 1152.0}};
  std::printf("%-70s %12s %8s\n", "GEMM per tile, one CTA per SM", "cycles/tile", "of peak");
  for (const Case& c : cases) {
    for (int rep = 0; rep < 2; ++rep)             // the first launch warms up clocks and caches
      probe::gemm_probe<<<sms, 256, smem>>>(c.mode, c.wgs, iters, cycles, sink);
    if (cudaDeviceSynchronize() != cudaSuccess) {
      std::printf("%s: launch failed: %s\n", c.name, cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    std::vector<long long> h(sms * 2);
    cudaMemcpy(h.data(), cycles, sizeof(long long) * sms * 2, cudaMemcpyDeviceToHost);
    std::vector<double> per_tile;
    for (int b = 0; b < sms; ++b) per_tile.push_back(double(h[b * 2]) / iters);   // warpgroup 0 of each CTA
    std::sort(per_tile.begin(), per_tile.end());
    const double med = per_tile[per_tile.size() / 2];
    std::printf("%-70s %12.1f %7.1f%%\n", c.name, med, 100.0 * c.ideal / med);
  }
  return 0;
}
