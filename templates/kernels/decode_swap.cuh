// The swapped schedule (qk = "swap16" / "swap32"): for few q rows per KV head (h_q / h_kv x s_q <= 32), the
// 64 tokens of a KV tile are the wgmma M and the q rows its N, so no tensor-core work or shared-memory
// bandwidth goes to padding rows (the other schedules pad the rows to M = 64).
//   warpgroup 0: S^T (64 tokens x N rows) = K Q^T (A = the K tile, B = Q, both K-major); the softmax runs down
//   the columns: per-column maxima across the thread's two tokens, the quad's lanes (shuffles) and the four
//   warps (shared memory); P^T goes to shared memory as the K-major B operand of P V, the per-row rescale
//   as `alpha`.
//   both warpgroups: O^T (256 channels x N rows each) += V^T P^T (A = V^T, the MN-major view of the K tile).
// The tile flow is the nsplit one: TMA ring on mbarriers, __syncthreads between the phases; a float8 cache is
// widened into one bf16 tile first (widen_fp8_tile) by all threads. With Cfg::kWidenAhead (float8, one stored
// stage) there are two widened tiles: warpgroup 1 widens tile j+1 and starts the load of tile j+2 while
// warpgroup 0 computes S and the softmax of tile j, so the widening leaves the critical path and a tile costs
// two barriers instead of three. Included by decode_kernel.cuh.
#pragma once

namespace fmla {

template <class Cfg>
__device__ __forceinline__ void decode_swap_tiles(const CUtensorMap& tmap_k, const FmlaParams& p) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  using SharedStorage = typename T::SharedStorage;
  using SmemLayoutQ = typename T::SmemLayoutQ;     // (N, 576)
  using SmemLayoutK = typename T::SmemLayoutK;     // (64 tokens, 576)
  using SmemLayoutVt = typename T::SmemLayoutVt;   // (512 channels, 64 tokens)
  using SmemLayoutP = typename T::SmemLayoutP;     // (N, 64 tokens): P^T, K-major
  using MmaS = typename T::MmaS;
  using MmaO = typename T::MmaO;
  constexpr int kD = T::kD, kN = T::kBM, kBN = T::kBN, kStages = T::kStages;
  constexpr int kDVw = T::kDVw;
  constexpr int kCols = kN / 4;                   // q rows (columns of S^T and O^T) per thread
  constexpr bool kAhead = Cfg::kWidenAhead;
  extern __shared__ char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(aligned_smem<2>(smem_raw));
  const int tid = threadIdx.x;
  const int wg = cutlass::canonical_warp_group_idx();
  const int wtid = tid % 128, warp = wtid / 32, lane = tid % 32;
  const int hk = blockIdx.y, mb = blockIdx.z;
  const int groups = p.h_q / p.h_kv;
  const int rows = p.s_q * groups;

  const CtaStart cs = cta_start<Cfg>(tmap_k, p);
  const float kv_scale = cs.kv_scale, qk_scale = cs.qk_scale, scale_log2 = cs.scale_log2;
  if (cs.end_req < cs.begin_req) return;          // idle partition

  if (tid == 0) {
    CUTE_UNROLL
    for (int st = 0; st < kStages; ++st) cutlass::arch::ClusterTransactionBarrier::init(&s.full[st], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(s.q), SmemLayoutQ{});
  Tensor sP = make_tensor(make_smem_ptr(s.p), SmemLayoutP{});
  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(wtid);
  auto thr_o = mma_o.get_thread_slice(wtid);
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);
  Tensor tOrP = thr_o.partition_fragment_B(sP);
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kN>>{}));    // (token, q row)
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kDVw>, Int<kN>>{}));   // (channel, q row)
  // A thread's columns of a wgmma accumulator: 8 * j + 2 * (lane % 4) + k (j < N / 8, k < 2); element i of a
  // fragment holds column slot (i % 2) + 2 * j, j = (i % (N / 2)) / 4 (values ordered (k, row half, j), then
  // the M tiles).
  auto col_of = [&](int c) { return 8 * (c / 2) + 2 * (lane % 4) + (c % 2); };
  auto slot_of = [](int i) { return (i % 2) + 2 * ((i % (kN / 2)) / 4); };

  int iter = 0;
  for (int req = cs.begin_req; req <= cs.end_req; ++req) {
    const RequestSpan span = request_span<Cfg>(p, cs, req);   // its loads first, ahead of Q's in the queue
    start_request<Cfg>(p, cs, sQ, req, hk, mb, groups, rows);
    const int seqlen = span.seqlen, tok_lo = span.tok_lo, tok_hi = span.tok_hi, n_iter = span.n_iter;
    const int n_splits = span.n_splits, slot = span.slot;

    fill_ring<Cfg>(&tmap_k, p, s, iter, req, hk, span);

    // Column (q row) state of warpgroup 0: causal limit, running max and this thread's share of the sum.
    int limit[kCols];
    float m_run[kCols], l_run[kCols];
    int min_limit = seqlen;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int rr = mb * kN + col_of(c);
      limit[c] = (p.causal && rr < rows) ? seqlen - (p.s_q - 1 - rr / groups) : seqlen;
      min_limit = min(min_limit, limit[c]);
      m_run[c] = -INFINITY;
      l_run[c] = 0.f;
    }
    Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kDVw>, Int<kN>>{});
    clear(acc_o);
    if constexpr (kAhead) {
      // The request's first tile: widened by everyone; then the stored stage takes the second.
      if (n_iter > 0) {
        cutlass::arch::ClusterTransactionBarrier::wait(&s.full[0], iter & 1);
        widen_fp8_tile<Cfg>(s, 0, tok_hi - tok_lo, tid, iter % 2);
        cutlass::arch::fence_view_async_shared();
        __syncthreads();
        if (tid == 0 && n_iter > 1) load_stage<Cfg>(&tmap_k, p, s, 0, req, hk, tok_lo + kBN, seqlen);
      }
    }

    for (int j = 0; j < n_iter; ++j, ++iter) {
      const int stage = iter % kStages;
      const int tok0 = tok_lo + j * kBN;
      if constexpr (!kAhead) cutlass::arch::ClusterTransactionBarrier::wait(&s.full[stage], (iter / kStages) & 1);
      const int kbuf = kAhead ? iter % 2 : T::kKvFp8 ? 0 : stage;
      Tensor sK = make_tensor(make_smem_ptr(s.k[kbuf]), SmemLayoutK{});
      // (widen ahead: tile j was widened in the previous iteration, or above for the request's first tile)
      if constexpr (!kAhead) prepare_tile<Cfg>(&tmap_k, p, s, sK, stage, j, req, hk, tok0, span);

      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBN>, Int<kN>>{});
      if (wg == 0) {
        Tensor tSrK = thr_s.partition_fragment_A(sK);
        gemm_ss<false>(mma_s, tSrK, tSrQ, acc_s);

        // Mask, then per-column maxima: the thread's two tokens, the 8 lanes sharing its columns, the 4 warps.
        float mx[kCols];
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) mx[c] = -INFINITY;
        const bool need_mask = tok0 + kBN > min_limit;
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) {
          const int c = slot_of(i);
          if (need_mask && tok0 + get<0>(cS(i)) >= limit[c]) acc_s(i) = -INFINITY;
          mx[c] = fmaxf(mx[c], acc_s(i));
        }
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 4));
          mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 8));
          mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 16));
          if (lane < 4) s.red[warp][col_of(c)] = mx[c];
        }
      } else if constexpr (kAhead) {
        // Warpgroup 1: tile j+1 into the other widened buffer (free: both warpgroups passed the end of
        // iteration j-1, where it was last read), then the stored stage takes tile j+2.
        if (j + 1 < n_iter) {
          cutlass::arch::ClusterTransactionBarrier::wait(&s.full[0], (iter + 1) & 1);
          widen_fp8_tile<Cfg, 128>(s, 0, tok_hi - (tok0 + kBN), wtid, (iter + 1) % 2);
          if (j + 2 < n_iter) {
            cutlass::arch::NamedBarrier::sync(128, 2);      // every read of the stored stage done
            if (wtid == 0) load_stage<Cfg>(&tmap_k, p, s, 0, req, hk, tok0 + 2 * kBN, seqlen);
          }
        }
      }
      // Warpgroup 1 takes part in the exchange barriers too: a CTA-wide barrier between every write and read of
      // the exchanges (compute-sanitizer's racecheck reported hazards on them with a warpgroup-0 named barrier).
      __syncthreads();
      const int ab = iter % 2;                    // alpha of this tile (double-buffered across tiles)
      if (wg == 0) {
        float base[kCols];
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          const int col = col_of(c);
          const float m = fmaxf(fmaxf(m_run[c], fmaxf(s.red[0][col], s.red[1][col])), fmaxf(s.red[2][col], s.red[3][col]));
          base[c] = m == -INFINITY ? 0.f : m * scale_log2;
          const float alpha = m_run[c] == -INFINITY ? 0.f : exp2f(m_run[c] * scale_log2 - base[c]);
          m_run[c] = m;
          l_run[c] *= alpha;
          if (warp == 0 && lane < 4) s.alpha[ab][col] = alpha;
        }
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) {
          const int c = slot_of(i);
          const float pr = exp2f(acc_s(i) * scale_log2 - base[c]);
          l_run[c] += pr;
          sP(get<1>(cS(i)), get<0>(cS(i))) = Element(pr);
        }
      }
      cutlass::arch::fence_view_async_shared();
      __syncthreads();                            // P^T and alpha published (and a tile widened ahead)

      float a[kCols];
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) a[c] = s.alpha[ab][col_of(c)];
      CUTE_UNROLL
      for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= a[slot_of(i)];
      Tensor sVt = make_tensor(make_smem_ptr(s.k[kbuf]), SmemLayoutVt{});
      Tensor tOrV = thr_o.partition_fragment_A(local_tile(sVt, Shape<Int<kDVw>, Int<kBN>>{}, make_coord(wg, 0)));
      gemm_ss<true>(mma_o, tOrV, tOrP, acc_o);
      __syncthreads();                            // stage, P^T and alpha free for reuse

      if (!T::kKvFp8 && tid == 0 && j + kStages < n_iter)
        load_stage<Cfg>(&tmap_k, p, s, stage, req, hk, tok0 + kStages * kBN, seqlen);
    }

    // Column sums (warpgroup 0) -> (dequantisation scale) / sum and lse per q row, in shared memory.
    if (wg == 0) {
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        float l = l_run[c];
        l += __shfl_xor_sync(0xffffffffu, l, 4);
        l += __shfl_xor_sync(0xffffffffu, l, 8);
        l += __shfl_xor_sync(0xffffffffu, l, 16);
        if (lane < 4) s.red[warp][col_of(c)] = l;
      }
    }
    __syncthreads();
    const int rb = req % 2;                       // inv / lse of this request (double-buffered across requests)
    if (wg == 0) {
      if (warp == 0 && lane < 4) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          const int col = col_of(c);
          const float l = s.red[0][col] + s.red[1][col] + s.red[2][col] + s.red[3][col];
          s.inv[rb][col] = l > 0.f ? kv_scale / l : 0.f;
          // Empty rows: +inf is the final convention, -inf marks "no mass" in split partials.
          s.lse[rb][col] = l > 0.f ? m_run[c] * qk_scale + logf(l) : (n_splits > 1 ? -INFINITY : INFINITY);
        }
      }
    }
    __syncthreads();

    // Output: O^T (channel, q row) -> row-major out / o_accum; each thread's (channel, row) pairs.
    const bool is_split = n_splits > 1;
    const OutRows out{req, slot, is_split, mb, hk, groups, rows};
    float inv[kCols];
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) inv[c] = s.inv[rb][col_of(c)];
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) {
      const int col = get<1>(cO(i));
      const int rr = mb * kN + col;
      if (rr >= rows) continue;
      const int ch = wg * kDVw + get<0>(cO(i));
      const float v = acc_o(i) * inv[slot_of(i)];
      if (is_split) p.o_accum[out.o_offset(p, rr) + ch] = v;
      else static_cast<Element*>(p.out)[out.o_offset(p, rr) + ch] = Element(v);
    }
    if (tid < kN) {
      const int rr = mb * kN + tid;
      if (rr < rows) (is_split ? p.lse_accum : p.lse)[out.lse_offset(p, rr)] = s.lse[rb][tid];
    }
    __syncthreads();                              // Q, inv, lse and red are rewritten by the next request
  }
}

}  // namespace fmla
