"""One call of a peer implementation on random inputs, for Nsight Compute (``ncupeer`` step of device_peers.sh).

Usage: ``python bench/peer_once.py PEER_DIR "b,s_q,h_q,sk[,fixed][,causal]"``. ``PEER_DIR`` holds a package named
``flash_mla`` with FlashMLA's classic API; it goes first on ``sys.path`` (this project is not imported: every peer
package has that name). Lengths are ``sk`` for every request with ``fixed``, else drawn uniformly from
[sk / 2, 3 sk / 2]; the KV cache is random bf16 with 64-token pages, one KV head. Two calls, then a finiteness
check of the output; under ncu every kernel of the process is profiled (the input set-up's, both calls' and the
check's), so the peer's kernels are found by name in the report. The ``ncupeer`` step runs this once beforehand so
that a peer that compiles at first use has its cache filled.
"""

import sys


def main(peer_dir: str, spec: str) -> int:
    sys.path.insert(0, peer_dir)
    import torch
    import flash_mla                                  # the peer
    parts = spec.split(",")
    b, s_q, h_q, sk = (int(x) for x in parts[:4])
    fixed, causal = "fixed" in parts[4:], "causal" in parts[4:]
    g = torch.Generator(device="cuda").manual_seed(0)
    if fixed:
        lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
    else:
        lens = torch.randint(sk // 2, sk * 3 // 2 + 1, (b,), generator=g, device="cuda", dtype=torch.int32)
    page, d, dv = 64, 576, 512
    pages_per = (int(lens.max()) + page - 1) // page
    k = torch.randn(b * pages_per, page, 1, d, generator=g, device="cuda").to(torch.bfloat16)
    bt = torch.arange(b * pages_per, dtype=torch.int32, device="cuda").view(b, pages_per)
    q = torch.randn(b, s_q, h_q, d, generator=g, device="cuda").to(torch.bfloat16)
    meta, splits = flash_mla.get_mla_metadata(lens, s_q * h_q, 1)
    for _ in range(2):
        out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, lens, dv, meta, splits, softmax_scale=d ** -0.5,
                                                    causal=causal)
    torch.cuda.synchronize()
    print(f"{peer_dir}: {spec}: out {tuple(out.shape)}, finite {bool(torch.isfinite(out).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
