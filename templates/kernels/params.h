// C ABI shared by every built variant and the Python runtime (flash_mla/runtime.py mirrors it with
// ctypes). Plain C: a variant is a shared library with no Python or torch inside it.
#pragma once
#include <stdint.h>

// 3: every variant library also exports the split-KV schedule kernel (kernels/schedule.cuh):
//   int fmla_schedule(const int32_t* seqlens, int32_t* metadata, int32_t* num_splits, long long* workspace,
//                     int b, int parts, int overhead, int min_payload, void* stream)
// 4: metadata columns 5..7 carry the first request's length and num_splits entries (flash_mla/scheduler.py);
//   the decode kernels other than qreg read them instead of cache_seqlens / num_splits for that request.
#define FMLA_ABI_VERSION 4

typedef struct FmlaParams {
  // inputs
  const void* q;              // (b, s_q, h_q, 576) bf16/fp16, last dim contiguous
  const void* k_cache;        // (num_blocks, page_size, h_kv, 576), last dim contiguous; q's dtype or float8 e4m3
  const int32_t* block_table; // (b, block_table_stride) page indices
  const int32_t* cache_seqlens;   // (b,)
  const int32_t* metadata;        // (num_parts, 8) tile scheduler rows, see flash_mla/scheduler.py
  const int32_t* num_splits;      // (b + 1,) cumulative split counts
  // outputs
  void* out;                  // (b, s_q, h_q, 512), contiguous
  float* lse;                 // (b, h_q, s_q), contiguous
  float* o_accum;             // (max_splits, h_kv, rows, 512) fp32 partial outputs of split requests
  float* lse_accum;           // (max_splits, h_kv, rows)
  // element strides
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  int64_t k_block_stride, k_row_stride, k_head_stride;
  int64_t block_table_stride;
  // sizes
  int32_t batch, s_q, h_q, h_kv, num_blocks, num_parts, max_splits;
  int32_t causal;
  float scale;                // softmax scale (natural units)
  // float8 e4m3 KV cache only: dequantised value = stored value * k_scale_value * (*k_scale) (k_scale: a
  // device float, or null for 1)
  const float* k_scale;
  float k_scale_value;
} FmlaParams;
