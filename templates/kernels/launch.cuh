// Host side of a variant: the KV cache's TMA descriptor and the launch of decode + combine, templated on the
// variant's configuration like the kernels (templates/variant.cu.j2 instantiates it behind the C ABI).
#pragma once

#include <type_traits>

#include <cuda.h>
#include <cuda_runtime.h>

#include "combine_kernel.cuh"
#include "decode_kernel.cuh"

namespace fmla {

typedef CUresult (*EncodeTiledFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                  const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver entry point is fetched through the runtime so the library needs no -lcuda.
inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  if (!fn) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  return fn;
}

// 4-D view of the paged cache: (channel, kv head, row in page, page); OOB pages read as zeros.
template <class Cfg>
int make_kv_tensor_map(CUtensorMap* map, const FmlaParams& p) {
  using T = DecodeTraits<Cfg>;
  using KvElement = typename T::KvElement;
  EncodeTiledFn encode = encode_tiled();
  if (!encode) return int(cudaErrorNotSupported);
  const cuuint64_t es = sizeof(KvElement);
  if constexpr (T::kTmaTile) {
    // (channel in chunk, row in page, chunk, kv head, page): the chunk axis strides 128 bytes inside a row, so one
    // box (64, kBN, kPartChunks, 1, 1) lands a part of a stage (tile: all of it; tile3: a third) as kPartChunks
    // consecutive [row][64] swizzled chunks.
    cuuint64_t dims[5] = {cuuint64_t(T::kBoxCh), cuuint64_t(T::kPage), cuuint64_t(T::kChunks), cuuint64_t(p.h_kv),
                          cuuint64_t(p.num_blocks)};
    cuuint64_t strides[4] = {cuuint64_t(p.k_row_stride) * es, cuuint64_t(T::kBoxCh) * es,
                             cuuint64_t(p.k_head_stride) * es, cuuint64_t(p.k_block_stride) * es};
    cuuint32_t box[5] = {cuuint32_t(T::kBoxCh), cuuint32_t(T::kBN), cuuint32_t(T::kPartChunks), 1, 1};
    cuuint32_t estr[5] = {1, 1, 1, 1, 1};
    const CUtensorMapDataType dt = std::is_same_v<KvElement, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    CUresult r = encode(map, dt, 5, const_cast<void*>(p.k_cache), dims, strides, box, estr,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 0 : int(cudaErrorInvalidValue);
  }
  cuuint64_t dims[4] = {cuuint64_t(T::kD), cuuint64_t(p.h_kv), cuuint64_t(T::kPage), cuuint64_t(p.num_blocks)};
  cuuint64_t strides[3] = {cuuint64_t(p.k_head_stride) * es, cuuint64_t(p.k_row_stride) * es,
                           cuuint64_t(p.k_block_stride) * es};
  cuuint32_t box[4] = {cuuint32_t(T::kBoxCh), 1, cuuint32_t(T::kBoxRows), 1};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  // bf16 / fp16 tiles land in the 128-byte swizzle the wgmmas read; fp8 tiles as plain bytes (widened by the
  // kernel into the swizzled bf16 tile).
  const CUtensorMapDataType dt = T::kKvFp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                 : std::is_same_v<KvElement, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUresult r = encode(map, dt, 4, const_cast<void*>(p.k_cache), dims, strides, box, estr,
                      CU_TENSOR_MAP_INTERLEAVE_NONE,
                      T::kKvFp8 ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : int(cudaErrorInvalidValue);
}

// Q as a 4-D tensor (channel, head, query position, request) for the schedules that load Q by TMA
// (DecodeTraits::kQTma), one box per 64-channel chunk of a 64-row tile: 64 heads of one query position where a kv
// head's group of q heads is a multiple of 64, else the whole group by 64 / group query positions (rows past s_q are
// out of bounds: zeros). Returns 1 with the map written, 0 where the kernel loads Q by cp.async instead: other
// schedules, a group size that neither divides nor is a multiple of 64 (such a tile mixes query positions unevenly),
// strides or an address a tensor map cannot take, or an empty batch.
template <class Cfg>
int make_q_tensor_map(CUtensorMap* map, const FmlaParams& p) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  if constexpr (!T::kQTma) {
    return 0;
  } else {
    const int groups = p.h_q / p.h_kv;
    if (p.batch <= 0 || groups <= 0 || (groups % T::kBM != 0 && T::kBM % groups != 0)) return 0;
    const cuuint64_t es = sizeof(Element);
    const cuuint64_t strides[3] = {cuuint64_t(p.q_head_stride) * es, cuuint64_t(p.q_seq_stride) * es,
                                   cuuint64_t(p.q_batch_stride) * es};
    if (reinterpret_cast<uintptr_t>(p.q) % 16 != 0) return 0;
    for (cuuint64_t st : strides)
      if (st % 16 != 0 || st >= (cuuint64_t(1) << 40)) return 0;
    EncodeTiledFn encode = encode_tiled();
    if (!encode) return 0;
    const cuuint64_t dims[4] = {cuuint64_t(T::kD), cuuint64_t(p.h_q), cuuint64_t(p.s_q), cuuint64_t(p.batch)};
    const int box_heads = groups < T::kBM ? groups : T::kBM;
    const cuuint32_t box[4] = {64, cuuint32_t(box_heads), cuuint32_t(T::kBM / box_heads), 1};
    const cuuint32_t estr[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dt = std::is_same_v<Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                              : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    CUresult r = encode(map, dt, 4, const_cast<void*>(p.q), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 1 : 0;
  }
}

// Launches decode + combine on `stream`. Returns a cudaError_t value (0 = success). No host sync.
template <class Cfg>
int launch(const FmlaParams* params, void* stream) {
  using T = DecodeTraits<Cfg>;
  constexpr int kBM = T::kBM, kThreads = T::kThreads, kSmemBytes = T::kSmemBytes;
  const FmlaParams& p = *params;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // The dynamic shared-memory opt-in is a property of the function on one device: set once per device.
  constexpr int kMaxDevices = 64;
  static bool attr_set[kMaxDevices] = {};
  int dev = 0;
  cudaError_t de = cudaGetDevice(&dev);
  if (de != cudaSuccess) return int(de);
  if (dev < 0 || dev >= kMaxDevices) return int(cudaErrorInvalidDevice);
  if (!attr_set[dev]) {
    cudaError_t e = cudaFuncSetAttribute(decode_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (e != cudaSuccess) return int(e);
    attr_set[dev] = true;
  }
  CUtensorMap tmap, tmap_q = {};
  int err = make_kv_tensor_map<Cfg>(&tmap, p);
  if (err) return err;
  const int q_tma = make_q_tensor_map<Cfg>(&tmap_q, p);
  const int rows = p.s_q * (p.h_q / p.h_kv);
  constexpr int kCluster = T::kCluster;
  // Row blocks along z, rounded up to whole clusters (a padding block's rows are past `rows`: zero Q, no stores).
  const int m_blocks = (rows + kBM - 1) / kBM;
  dim3 grid(p.num_parts, p.h_kv, (m_blocks + kCluster - 1) / kCluster * kCluster);
  cudaError_t e;
  auto combine_separate = [&]() {          // the plain merge launch: one warp per q row
    if (p.batch <= 0) return cudaSuccess;
    dim3 cgrid(p.batch, p.h_kv, (rows + Cfg::kCombineRows - 1) / Cfg::kCombineRows);
    combine_kernel<Cfg><<<cgrid, Cfg::kCombineRows * 32, 0, st>>>(p);
    return cudaGetLastError();
  };
  if constexpr (Cfg::kMerge == Merge::kSeparate && kCluster == 1) {
    decode_kernel<Cfg><<<grid, kThreads, kSmemBytes, st>>>(tmap, tmap_q, p, q_tma);
    e = cudaGetLastError();
    if (e != cudaSuccess) return int(e);
    e = combine_separate();
  } else {
    // Programmatic dependent launch (the wide merge) and / or the cluster shape.
    cudaLaunchAttribute attrs[2];
    unsigned n_attrs = 0;
    if constexpr (Cfg::kMerge == Merge::kWidePdl) {
      attrs[n_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attrs[n_attrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if constexpr (kCluster > 1) {
      attrs[n_attrs].id = cudaLaunchAttributeClusterDimension;
      attrs[n_attrs].val.clusterDim.x = 1;
      attrs[n_attrs].val.clusterDim.y = 1;
      attrs[n_attrs++].val.clusterDim.z = kCluster;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = kSmemBytes;
    cfg.stream = st;
    cfg.attrs = attrs;
    cfg.numAttrs = n_attrs;
    e = cudaLaunchKernelEx(&cfg, decode_kernel<Cfg>, tmap, tmap_q, p, q_tma);
    if (e != cudaSuccess) return int(e);
    if constexpr (Cfg::kMerge == Merge::kSeparate) {
      e = combine_separate();
    } else if (p.batch > 0) {
      // y: one CTA row per request, or per partition where there are more requests than partitions (at most
      // one split request ends in each partition). Rows per CTA grow with the work so that the grid stays
      // near 4096 CTAs.
      const int by_partition = p.batch > p.num_parts;
      const int ny = by_partition ? p.num_parts : p.batch;
      const long long row_slices = (long long)ny * p.h_kv * rows * kWideSlices;
      int rpc = 1;
      while (rpc < kWideGroups && row_slices > 4096LL * rpc) rpc *= 2;
      cfg.gridDim = dim3(p.h_kv * ((rows + rpc - 1) / rpc) * kWideSlices, ny, 1);
      cfg.blockDim = dim3(kWideThreads);
      cfg.dynamicSmemBytes = size_t(rpc) * p.num_parts * sizeof(float);
      cfg.numAttrs = 1;                    // programmatic dependent launch only (attrs[0]), no cluster
      e = cudaLaunchKernelEx(&cfg, static_cast<void (*)(FmlaParams, int, int, int)>(combine_kernel<Cfg>), p, rpc,
                             int(p.num_parts), by_partition);
    }
  }
  return int(e);
}

}  // namespace fmla
