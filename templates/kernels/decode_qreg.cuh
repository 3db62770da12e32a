// The qreg schedule (qk = "qreg"): three warpgroups with distinct roles, for the compute-bound shapes.
//   warpgroup 0 holds the first kQregChannels channels of its 64 Q rows in registers for the whole request
//   (96 registers) and computes the full 64 x BLOCK_N S of every tile: register-A wgmmas over those channels, then
//   shared-memory wgmmas over the other 192 (Q's rest stays in shared memory). Then the softmax, P (stmatrix) into
//   the stage's rope chunk, the rows' rescale into shared memory, and on to the next tile at once: its softmax
//   and QK overlap the P V of the other two. qk = "qreg_ahead" (Cfg::kQk == Qk::kQregAhead) issues Q K^T of tile
//   j+1, into a second S accumulator, before the softmax of tile j (32-token tiles: two S tiles beside Q's 96
//   registers).
//   warpgroups 1 and 2 each accumulate one half of the 512 output channels, O += P V; the first thread of
//   warpgroup 1 issues the TMA loads of the ring.
// Q's smaller shared-memory share leaves room for a deeper ring (five 32-token stages: four tiles in flight while
// one is computed; the nsplit and full_wg schedules hold two 64-token stages). Every role fits the 168 registers
// of a 384-thread CTA. No CTA-wide barrier after the start: full (TMA bytes), pready (P and the rescale of a stage
// published by warpgroup 0) and empty (warpgroups 1 and 2 done with a stage) mbarriers.
// In clusters of two (kCluster = 2: the CTAs of row blocks 2c and 2c + 1, same work list) each producer loads half
// of every tile's boxes, multicast into both CTAs; a stage is refilled only once the output warpgroups of both
// CTAs released it (every thread arrives on its CTA's empty barrier, one lane per warp on the other CTA's).
// Included by decode_kernel.cuh.
#pragma once

namespace fmla {

template <class Cfg>
__device__ __forceinline__ void decode_qreg_tiles(const CUtensorMap& tmap_k, const FmlaParams& p) {
  using T = DecodeTraits<Cfg>;
  using Element = typename T::Element;
  using SharedStorage = typename T::SharedStorage;
  using SmemLayoutK = typename T::SmemLayoutK;     // (64 tokens, 576)
  using SmemLayoutVt = typename T::SmemLayoutVt;   // (512 channels, 64 tokens)
  using SmemLayoutP = typename T::SmemLayoutP;     // (64 rows, 64 tokens): a stage's rope chunk
  using SmemLayoutQr = typename T::SmemLayoutQr;   // (64 rows, the 192 channels of Q not in registers)
  using MmaO = typename T::MmaO;                   // 64 x 256 x BLOCK_N, P and V from shared memory
  constexpr int kD = T::kD, kBM = T::kBM, kBN = T::kBN, kStages = T::kStages, kDVw = T::kDVw;
  constexpr int kQc = kQregChannels, kQs = kD - kQregChannels;
  // S = Q K^T in two parts accumulating into one fragment: channels [0, kQc) with Q from registers, [kQc, 576)
  // with Q from shared memory. Same accumulator layout.
  using MmaQn = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Element, Element, float,
      Shape<Int<kBM>, Int<kBN>, Int<kQc>>>()));
  using MmaQr = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Element, Element, float,
      Shape<Int<kBM>, Int<kBN>, Int<kQs>>>()));
  extern __shared__ char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(aligned_smem<2>(smem_raw));
  const int tid = threadIdx.x;
  const int wg = cutlass::canonical_warp_group_idx();
  const int wtid = tid % 128;
  const int hk = blockIdx.y, mb = blockIdx.z;
  const int groups = p.h_q / p.h_kv;
  const int rows = p.s_q * groups;

  const CtaStart cs = cta_start<Cfg>(tmap_k, p);
  const float qk_scale = cs.qk_scale, scale_log2 = cs.scale_log2;
  if (cs.end_req < cs.begin_req) return;          // idle partition

  constexpr int kCluster = T::kCluster;
  if (tid == 0) {
    CUTE_UNROLL
    for (int st = 0; st < kStages; ++st) {
      CUTE_UNROLL
      for (int g = 0; g < T::kTileParts; ++g) cutlass::arch::ClusterTransactionBarrier::init(full_bar<Cfg>(s, st, g), 1);
      cutlass::arch::ClusterBarrier::init(&s.pready[st], 128);
      cutlass::arch::ClusterBarrier::init(&s.empty[st], kEmptyArrivals<Cfg, 256>);   // warpgroups 1 and 2
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kCluster > 1) cute::cluster_sync();   // the peer's barriers exist before any multicast or arrive
  else __syncthreads();

  int iter = 0;                                   // global stage counter: drives mbarrier phases
  if (wg == 0) {
    MmaQn mma_qn;
    MmaQr mma_qr;
    auto thr_qn = mma_qn.get_thread_slice(wtid);
    auto thr_qr = mma_qr.get_thread_slice(wtid);
    // Q's first kQc channels as the register A operand, and the (row, channel) of each of its elements.
    Tensor tSrQ = thr_qn.partition_fragment_A(make_tensor(make_smem_ptr(s.q), Shape<Int<kBM>, Int<kQc>>{}));
    Tensor cQ = thr_qn.partition_A(make_identity_tensor(Shape<Int<kBM>, Int<kQc>>{}));
    Tensor cS = thr_qr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    const int r0 = get<0>(cS(0));
    Tensor acc_s = partition_fragment_C(mma_qr, Shape<Int<kBM>, Int<kBN>>{});
    // qreg_ahead's second S accumulator: Q K^T of the next tile in flight during this one's softmax.
    Tensor acc_s2 = partition_fragment_C(mma_qr, Shape<Int<kBM>, Int<kBN>>{});

    for (int req = cs.begin_req; req <= cs.end_req; ++req) {
      const RequestSpan span = request_span<Cfg>(p, cs, req);
      // Q of this (request, kv head, row block): channels [kQc, 576) into shared memory (cp.async), the others
      // into registers (two adjacent channels per 32-bit load: elements i and i + 1 of the fragment). Rows past
      // the request's rows are zeros. The previous request's last Q K^T has completed (waited below).
      Tensor sQr = make_tensor(make_smem_ptr(s.q), SmemLayoutQr{});
      start_request<Cfg, kQc, 128>(p, cs, sQr, req, hk, mb, groups, rows, wtid);
      const Element* qrow[2];
      bool qok[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int rr = mb * kBM + r0 + 8 * h;
        qok[h] = rr < rows;
        qrow[h] = qok[h] ? q_row<Element>(p, req, rr, groups, hk) : static_cast<const Element*>(p.q);
      }
      CUTE_UNROLL
      for (int i = 0; i < size(tSrQ); i += 2) {
        const int h = get<0>(cQ(i)) != r0;
        cutlass::Array<Element, 2> pair;
        pair.clear();
        if (qok[h]) pair = *reinterpret_cast<const cutlass::Array<Element, 2>*>(qrow[h] + get<1>(cQ(i)));
        tSrQ(i) = pair[0];
        tSrQ(i + 1) = pair[1];
      }
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(128, 1);  // every shared-memory piece of Q landed before the wgmmas read it

      int limit[2];
      causal_limits<kBM>(p, mb, r0, groups, rows, span.seqlen, limit);
      float m_run[2] = {-INFINITY, -INFINITY};
      float l_run[2] = {0.f, 0.f};
      float alpha[2];
      // S = Q K^T of tile t into acc: waits for the tile's bytes, issues, does not wait for the wgmmas.
      auto issue_qk = [&](int t, auto& acc) {
        const int it = iter + t, st = it % kStages;
        trace_stamp(0, it, 0);                    // trace: wait for the tile ...
        cutlass::arch::ClusterTransactionBarrier::wait(full_bar<Cfg>(s, st), (it / kStages) & 1);   // (part 0)
        trace_stamp(0, it, 1);                    // ... landed
        Tensor sK = make_tensor(make_smem_ptr(s.k[st]), SmemLayoutK{});
        Tensor tSrKn = thr_qn.partition_fragment_B(local_tile(sK, Shape<Int<kBN>, Int<kQc>>{}, make_coord(0, 0)));
        Tensor tSrKr = thr_qr.partition_fragment_B(local_tile(sK, Shape<Int<kBN>, Int<kQs>>{}, make_coord(0, kQc / kQs)));
        // Q's shared-memory descriptors from an opaque pointer per tile (hoisted, they would live in registers).
        Tensor tSsQr = thr_qr.partition_fragment_A(make_tensor(make_smem_ptr(opaque_ptr(s.q)), SmemLayoutQr{}));
        issue_qk_split(mma_qn, tSrQ, tSrKn, mma_qr, tSsQr, tSrKr, acc, WaitTilePart<Cfg, SharedStorage>{s, it});
        trace_stamp(0, it, 2);                    // Q K^T issued
      };
      // The softmax of tile t (its Q K^T waited for), P published.
      auto softmax = [&](int t, auto& acc) {
        trace_stamp(0, iter + t, 3);              // Q K^T done
        Tensor rP = make_tensor_like<Element>(acc);   // P of the tile (published through shared memory)
        softmax_tile<Cfg>(t, acc, cS, mma_qr, s, iter, span.tok_lo, span.tok_hi, limit, r0, wtid, scale_log2,
                          m_run, l_run, alpha, rP);
        trace_stamp(0, iter + t, 4);              // P published
      };
      const int n_iter = span.n_iter;
      if constexpr (T::kQkAhead) {
        // Q K^T of tile j+1 is issued before the softmax of tile j (into the other accumulator), so the tensor
        // cores work through the softmax. Tiles go in pairs so that each accumulator stays one set of registers;
        // the last one or two are peeled (no wgmma in a loop branch with another wait).
        // Every path below holds exactly one batch in flight at the loop head (ptxas serialises every wgmma when
        // it cannot count them), hence the one test of n_iter around all of it.
        if (n_iter > 0) {
          issue_qk(0, acc_s);
          int j = 0;
          for (; j + 2 < n_iter; j += 2) {
            issue_qk(j + 1, acc_s2);
            warpgroup_wait<1>();                  // Q K^T of tile j done, tile j+1's in flight
            softmax(j, acc_s);
            issue_qk(j + 2, acc_s);
            warpgroup_wait<1>();
            softmax(j + 1, acc_s2);
          }
          if (j + 1 < n_iter) {                   // two tiles left
            issue_qk(j + 1, acc_s2);
            warpgroup_wait<1>();
            softmax(j, acc_s);
            warpgroup_wait<0>();
            softmax(j + 1, acc_s2);
          } else {                                // one tile left
            warpgroup_wait<0>();
            softmax(j, acc_s);
          }
        }
      } else {
        for (int j = 0; j < n_iter; ++j) {
          issue_qk(j, acc_s);
          warpgroup_wait<0>();
          softmax(j, acc_s);
        }
      }
      iter += span.n_iter;

      float lse[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(l_run[h]);
        // Empty rows: +inf is the final convention, -inf marks "no mass" in split partials.
        lse[h] = l > 0.f ? m_run[h] * qk_scale + logf(l) : (span.n_splits > 1 ? -INFINITY : INFINITY);
      }
      const OutRows out{req, span.slot, span.n_splits > 1, mb, hk, groups, rows};
      store_lse<Cfg>(p, out, r0, wtid, lse);
    }
  } else {
    constexpr int kProducer = T::kProducer;
    const int half = wg - 1;                      // output channels [half * 256, half * 256 + 256)
    MmaO mma_o;
    auto thr_o = mma_o.get_thread_slice(wtid);
    Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kDVw>>{}));
    const int r0 = get<0>(cO(0));

    for (int req = cs.begin_req; req <= cs.end_req; ++req) {
      const RequestSpan span = request_span<Cfg>(p, cs, req);
      const int n_iter = span.n_iter;
      // The producer fills the ring for this request: a stage is reloaded only after warpgroups 1 and 2 arrived
      // on its empty barrier for the tile it held.
      if (tid == kProducer) {
        for (int j = 0; j < min(n_iter, kStages); ++j) {
          const int it = iter + j;
          if (it >= kStages) cutlass::arch::ClusterBarrier::wait(&s.empty[it % kStages], (it / kStages - 1) & 1);
          load_stage<Cfg>(&tmap_k, p, s, it % kStages, req, hk, span.tok_lo + j * kBN, span.seqlen);
        }
      }
      Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBM>, Int<kDVw>>{});
      clear(acc_o);
      float inv[2] = {0.f, 0.f};
      for (int j = 0; j < n_iter; ++j) {
        const int it = iter + j, st = it % kStages;
        trace_stamp(wg, it, 0);                   // trace: wait for P ...
        cutlass::arch::ClusterBarrier::wait(&s.pready[st], (it / kStages) & 1);
        trace_stamp(wg, it, 1);                   // ... published
        const float a0 = s.alpha[st][r0], a1 = s.alpha[st][r0 + 8];
        if (a0 != 1.f || a1 != 1.f) {             // row maxima unchanged: most tiles after the first ones
          CUTE_UNROLL
          for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= (get<0>(cO(i)) - r0) >= 8 ? a1 : a0;
        }
        if (j + 1 == n_iter) {                    // the last tile: 1 / row sum came with it
          inv[0] = s.row_inv[st][r0];
          inv[1] = s.row_inv[st][r0 + 8];
        }
        Tensor tOrP = thr_o.partition_fragment_A(make_tensor(make_smem_ptr(p_tile<Cfg>(s, st)), SmemLayoutP{}));
        Tensor sVt = make_tensor(make_smem_ptr(s.k[st]), SmemLayoutVt{});
        Tensor tOrV = thr_o.partition_fragment_B(local_tile(sVt, Shape<Int<kDVw>, Int<kBN>>{}, make_coord(half, 0)));
        issue_ss<true>(mma_o, tOrP, tOrV, acc_o);
        trace_stamp(wg, it, 2);                   // P V issued
        warpgroup_wait<0>();
        trace_stamp(wg, it, 3);                   // P V done
        warpgroup_fence_operand(acc_o);
        release_stage<Cfg>(s, st);
        if (tid == kProducer && j + kStages < n_iter) {
          cutlass::arch::ClusterBarrier::wait(&s.empty[st], (it / kStages) & 1);
          trace_stamp(wg, it, 4);                 // stage released by both output warpgroups
          load_stage<Cfg>(&tmap_k, p, s, st, req, hk, span.tok_lo + (j + kStages) * kBN, span.seqlen);
          trace_stamp(wg, it, 5);                 // refill (tile it + kStages) issued
        }
      }
      iter += n_iter;
      const OutRows out{req, span.slot, span.n_splits > 1, mb, hk, groups, rows};
      store_o<Cfg>(p, out, acc_o, cO, r0, half * kDVw, inv);
    }
  }
  // No CTA of a cluster exits while its peer may still arrive on its barriers.
  if constexpr (kCluster > 1) cute::cluster_sync();
}

}  // namespace fmla
