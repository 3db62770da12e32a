// The decode step's host side in C++: torch.ops.flash_mla.mla_decode / mla_decode_out and the fast path of
// flash_mla_with_kvcache. Built once per install and torch version (flash_mla/launcher.py), not per variant.
//
// A call is keyed by its signature: every tensor's sizes, strides, dtype and device, the softmax scale, the
// causal flag, the length hint and the float part of a float8 cache's dequantisation scale. The first call of a signature goes to the Python resolver
// (flash_mla.launcher.resolve: the full argument validation, the tuning-DB selection, the variant library's
// load), which returns the variant's C entry point (templates/kernels/params.h); later calls of that signature
// skip all of it and only check what the signature does not fix (the data pointers' alignment). The launch
// itself fills FmlaParams from tensor metadata, allocates the outputs and the split workspace and calls the
// variant on the current CUDA stream: no host sync, so it is CUDA-graph safe.
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

extern "C" {
#include "params.h"
}
#include "mla_constants.h"

namespace py = pybind11;

namespace {

using LaunchFn = int (*)(const FmlaParams*, void*);

struct Plan {
  LaunchFn fn = nullptr;
  float scale = 0.f;
};

struct SigHash {
  size_t operator()(const std::vector<int64_t>& v) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : v) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

std::mutex g_mutex;
std::unordered_map<std::vector<int64_t>, Plan, SigHash> g_plans;
py::object* g_resolver = nullptr;     // flash_mla.launcher.resolve, set once at load; never freed (process-long)

void push_tensor(std::vector<int64_t>& sig, const at::Tensor& t) {
  if (!t.defined()) {
    sig.push_back(-1);
    return;
  }
  const int64_t d = t.dim();
  sig.push_back(d);
  for (int64_t i = 0; i < d; ++i) {
    sig.push_back(t.size(i));
    sig.push_back(t.stride(i));
  }
  sig.push_back(static_cast<int64_t>(t.scalar_type()));
  sig.push_back(static_cast<int64_t>(t.device().type()) * 4096 + t.device().index());
}

int64_t bits_of(std::optional<double> x) {
  if (!x) return INT64_MIN;
  int64_t b;
  double v = *x;
  static_assert(sizeof(b) == sizeof(v));
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

py::object py_opt(const std::optional<double>& x) { return x ? py::object(py::float_(*x)) : py::object(py::none()); }
py::object py_opt(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::object(py::none()); }

// The first call of a signature: validation, selection and library load in Python. Returns the plan and whether
// it may be cached (not when the caller asked for the per-call value checks).
std::pair<Plan, bool> resolve(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                              const at::Tensor& cache_seqlens, const at::Tensor& meta, const at::Tensor& splits,
                              std::optional<double> scale, bool causal, std::optional<double> hint,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& k_scale,
                              double k_scale_value) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(g_resolver != nullptr, "flash_mla launcher: no resolver registered (import flash_mla first)");
  py::tuple r = (*g_resolver)(q, k_cache, block_table, cache_seqlens, meta, splits, py_opt(scale), causal,
                              py_opt(hint), py_opt(out), py_opt(lse), py_opt(k_scale), k_scale_value);
  Plan plan;
  plan.fn = reinterpret_cast<LaunchFn>(r[0].cast<uintptr_t>());
  plan.scale = r[1].cast<float>();
  return {plan, r[2].cast<bool>()};
}

void check_aligned(const char* name, const at::Tensor& t) {
  // The kernel moves q rows with 16-byte loads and reads k_cache through a TMA descriptor; the strides are part
  // of the signature (checked by the resolver), the address is not.
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " must be 16-byte aligned with strides that are multiples of 8 elements, got a data pointer "
                    "at byte offset ", reinterpret_cast<uintptr_t>(t.data_ptr()) % 16, " from 16-byte alignment");
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                                       const at::Tensor& cache_seqlens, const at::Tensor& meta,
                                       const at::Tensor& splits, std::optional<double> scale, bool causal,
                                       std::optional<double> hint, const at::Tensor& out_in, const at::Tensor& lse_in,
                                       const at::Tensor& k_scale, double k_scale_value) {
  std::vector<int64_t> sig;
  sig.reserve(112);
  for (const at::Tensor* t : {&q, &k_cache, &block_table, &cache_seqlens, &meta, &splits, &out_in, &lse_in, &k_scale})
    push_tensor(sig, *t);
  sig.push_back(bits_of(scale));
  sig.push_back(causal);
  sig.push_back(bits_of(hint));
  sig.push_back(bits_of(k_scale_value));

  Plan plan;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_plans.find(sig);
    if (it != g_plans.end()) {
      plan = it->second;
      found = true;
    }
  }
  if (!found) {
    auto [p, cacheable] = resolve(q, k_cache, block_table, cache_seqlens, meta, splits, scale, causal, hint, out_in,
                                  lse_in, k_scale, k_scale_value);
    plan = p;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(g_mutex);
      g_plans.emplace(std::move(sig), plan);
    }
  } else {
    check_aligned("q", q);
    check_aligned("k_cache", k_cache);
  }

  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const int64_t num_blocks = k_cache.size(0), h_kv = k_cache.size(2);
  const int64_t rows = s_q * (h_q / h_kv);
  const int64_t num_parts = meta.size(0);
  const int64_t max_splits = splits.size(0) - 1 + num_parts;      // flash_mla.scheduler.max_total_splits

  c10::OptionalDeviceGuard guard(q.device());
  at::Tensor out = out_in.defined() ? out_in : at::empty({b, s_q, h_q, fmla::kHeadDimV}, q.options());
  at::Tensor lse = lse_in.defined() ? lse_in : at::empty({b, h_q, s_q}, q.options().dtype(at::kFloat));
  // o_accum (max_splits, h_kv, rows, 512) and lse_accum (max_splits, h_kv, rows) in one allocation.
  const int64_t accum_rows = max_splits * h_kv * rows;
  at::Tensor work = at::empty({accum_rows * (fmla::kHeadDimV + 1)}, q.options().dtype(at::kFloat));
  float* o_accum = work.data_ptr<float>();

  FmlaParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.metadata = meta.data_ptr<int32_t>();
  p.num_splits = splits.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_accum = o_accum;
  p.lse_accum = o_accum + accum_rows * fmla::kHeadDimV;
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_block_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.block_table_stride = block_table.stride(0);
  p.batch = static_cast<int32_t>(b);
  p.s_q = static_cast<int32_t>(s_q);
  p.h_q = static_cast<int32_t>(h_q);
  p.h_kv = static_cast<int32_t>(h_kv);
  p.num_blocks = static_cast<int32_t>(num_blocks);
  p.num_parts = static_cast<int32_t>(num_parts);
  p.max_splits = static_cast<int32_t>(max_splits);
  p.causal = causal && s_q > 1;
  p.scale = plan.scale;
  p.k_scale = k_scale.defined() ? k_scale.data_ptr<float>() : nullptr;
  p.k_scale_value = static_cast<float>(k_scale_value);

  // The current stream of q's device. Only CUDA tensors pass the resolver; others (the CPU tests' fake
  // variants) get no stream.
  void* stream = nullptr;
  if (q.device().is_cuda())
    stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device()).native_handle();
  const int err = plan.fn(&p, stream);
  TORCH_CHECK(err == 0, "flash_mla: variant launch failed with cudaError_t ", err,
              " (see cuda_runtime_api.h; run under compute-sanitizer for details)");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                              const at::Tensor& meta, const at::Tensor& splits,
                                              std::optional<double> scale, bool causal, std::optional<double> hint,
                                              const std::optional<at::Tensor>& k_scale, double k_scale_value) {
  return run(q, k_cache, block_table, cache_seqlens, meta, splits, scale, causal, hint, at::Tensor(), at::Tensor(),
             k_scale ? *k_scale : at::Tensor(), k_scale_value);
}

void mla_decode_out(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                    const at::Tensor& cache_seqlens, const at::Tensor& meta, const at::Tensor& splits,
                    at::Tensor& out, at::Tensor& lse, std::optional<double> scale, bool causal,
                    std::optional<double> hint, const std::optional<at::Tensor>& k_scale, double k_scale_value) {
  run(q, k_cache, block_table, cache_seqlens, meta, splits, scale, causal, hint, out, lse,
      k_scale ? *k_scale : at::Tensor(), k_scale_value);
}

}  // namespace

// The schemas live here (not in Python) so that the dispatcher reaches the C++ kernel without a Python frame;
// flash_mla/ops.py registers the fake (meta) implementations.
TORCH_LIBRARY(flash_mla, m) {
  m.def("mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale=None, bool causal=False, "
        "float? seqlen_hint=None, Tensor? k_scale=None, float k_scale_value=1.0) -> (Tensor, Tensor)");
  m.def("mla_decode_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, Tensor(a6!) out, Tensor(a7!) lse, "
        "float? softmax_scale=None, bool causal=False, float? seqlen_hint=None, Tensor? k_scale=None, "
        "float k_scale_value=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(flash_mla, CUDA, m) {
  m.impl("mla_decode", &mla_decode);
  m.impl("mla_decode_out", &mla_decode_out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "flash_mla's C++ launcher (see flash_mla/launcher.py)";
  mod.def("set_resolver", [](py::object fn) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_resolver == nullptr) g_resolver = new py::object();
    *g_resolver = std::move(fn);
  });
  mod.def("clear_plans", []() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_plans.clear();
  });
  mod.def("num_plans", []() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_plans.size();
  });
  // The API's fast path: the same launch without the dispatcher's boxing (flash_mla_with_kvcache calls this);
  // out / lse: caller-owned outputs as in mla_decode_out, or None.
  mod.def(
      "decode",
      [](const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
         const at::Tensor& meta, const at::Tensor& splits, std::optional<double> scale, bool causal,
         std::optional<double> hint, std::optional<at::Tensor> out, std::optional<at::Tensor> lse,
         std::optional<at::Tensor> k_scale, double k_scale_value) {
        py::gil_scoped_release no_gil;
        return run(q, k_cache, block_table, cache_seqlens, meta, splits, scale, causal, hint,
                   out ? *out : at::Tensor(), lse ? *lse : at::Tensor(), k_scale ? *k_scale : at::Tensor(),
                   k_scale_value);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("meta"),
      py::arg("splits"), py::arg("softmax_scale"), py::arg("causal"), py::arg("seqlen_hint"),
      py::arg("out") = py::none(), py::arg("lse") = py::none(), py::arg("k_scale") = py::none(),
      py::arg("k_scale_value") = 1.0);
}
