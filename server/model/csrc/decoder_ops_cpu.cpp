// The elementwise steps of a Llama-shaped decoder layer on CPU, one native call each: RMSNorm, RoPE
// of queries and keys, and SiLU(gate) * up. Each computes what the Hugging Face modules compute (see
// each op), on a decode step's few rows, where the eager forms are a handful of tensor ops apiece
// and their dispatch, not their arithmetic, is the cost: RMSNorm 7 ops, RoPE ~12 per layer, the MLP's
// activation 2. Measured on the development machine (bench model, batch-32 decode step of ~10 ms):
// RMSNorm 17 x ~25 us -> ~3 us, RoPE ~0.3 ms a step -> 8 x ~3 us, SiLU * up 8 x ~23 us -> ~4 us.
// One file, one build: each extension's first build on a machine is mostly parsing torch's headers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

using loraplex::load16;
using loraplex::load_vec;
using loraplex::v16;
using loraplex::vec;
constexpr int kLanes = loraplex::kVecLanes;

// ---- RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), fp32 statistics; for bf16 the normalised
// row is rounded to bf16 before the weight multiplies it, and the product rounded again (HF's
// LlamaRMSNorm).

template <typename T>
inline v16 round_like(v16 v) {  // the value a store to T keeps
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T tmp[16];
    loraplex::store16(tmp, v);
    return load16(tmp);
  }
}

template <typename T>
void norm_row(T* y, const T* x, const T* w, int64_t n, float eps) {
  v16 sq{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 v = load16(x + i);
    sq += v * v;
  }
  float sum = loraplex::hsum(sq);
  for (; i < n; ++i) sum += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (i = 0; i + 16 <= n; i += 16)
    loraplex::store16(y + i, load16(w + i) * round_like<T>(load16(x + i) * r));
  for (; i < n; ++i) {
    const float h = static_cast<float>(static_cast<T>(static_cast<float>(x[i]) * r));
    y[i] = static_cast<T>(static_cast<float>(w[i]) * h);
  }
}

template <typename T>
void norm_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps, int64_t grain) {
  T* op = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  at::parallel_for(0, x.size(0), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      norm_row(op + r * out.stride(0), xp + r * x.stride(0), wp, x.size(1), static_cast<float>(eps));
  });
}

// out, x: [R, H] with contiguous rows (any row stride); weight [H]; all one dtype (fp32 or bf16).
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && weight.dim() == 1 && x.size(1) == weight.size(0) &&
                  out.sizes() == x.sizes() && x.stride(1) == 1 && out.stride(1) == 1 && weight.is_contiguous(),
              "rms_norm: x, out [R, H] with contiguous rows, weight [H]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == weight.scalar_type(), "rms_norm: one dtype");
  const int64_t H = x.size(1), grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1));
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] { norm_rows<float>(out, x, weight, eps, grain); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { norm_rows<c10::BFloat16>(out, x, weight, eps, grain); }));
}

// ---- RoPE in place: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]), every
// product and the sum rounded to the tensor's dtype (HF's apply_rotary_pos_emb; fp32 products are not
// fused into FMAs, which would round once instead of twice).

template <typename T>
__attribute__((optimize("fp-contract=off"))) void rotate_row(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
    // HF: (x * cos) + (rotate_half(x) * sin), each op rounded to T
    const float lo = static_cast<float>(static_cast<T>(a * static_cast<float>(cos[i]))) +
                     static_cast<float>(static_cast<T>(-b * static_cast<float>(sin[i])));
    const float hi = static_cast<float>(static_cast<T>(b * static_cast<float>(cos[i + half]))) +
                     static_cast<float>(static_cast<T>(a * static_cast<float>(sin[i + half])));
    x[i] = static_cast<T>(lo);
    x[i + half] = static_cast<T>(hi);
  }
}

template <typename T>
void rope_rows(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t rows = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* c = cp + t * cos.stride(0);
      const T* s = sp + t * sin.stride(0);
      for (int64_t h = 0; h < hq; ++h) rotate_row(qp + t * q.stride(0) + h * q.stride(1), c, s, d / 2);
      for (int64_t h = 0; h < hk; ++h) rotate_row(kp + t * k.stride(0) + h * k.stride(1), c, s, d / 2);
    }
  });
}

// q [T, H, D], k [T, KVH, D] (head_dim contiguous, any other strides), cos, sin [T, D] (rows
// contiguous); one dtype. In place.
void rope(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && cos.dim() == 2 && sin.dim() == 2, "rope: q, k [T, H, D], cos, sin [T, D]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(0) == cos.size(0) && cos.sizes() == sin.sizes() &&
                  q.size(2) == k.size(2) && q.size(2) == cos.size(1) && q.size(2) % 2 == 0,
              "rope: shapes disagree");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && cos.stride(1) == 1 && sin.stride(1) == 1,
              "rope: head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(), "rope: one dtype");
  AT_DISPATCH_SWITCH(q.scalar_type(), "rope",
    AT_DISPATCH_CASE(at::kFloat, [&] { rope_rows<float>(q, k, cos, sin); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { rope_rows<c10::BFloat16>(q, k, cos, sin); }));
}

// ---- SiLU(gate) * up, fp32: gate / (1 + exp(-gate)) * up, as torch's silu then mul (exp to ~1 ulp
// rather than Sleef's, so results agree to float rounding, not bit for bit).

void silu_mul(at::Tensor out, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(out.dim() == 2 && gate.sizes() == out.sizes() && up.sizes() == out.sizes() && out.stride(1) == 1 &&
                  gate.stride(1) == 1 && up.stride(1) == 1, "silu_mul: out, gate, up [T, I] with contiguous rows");
  TORCH_CHECK(out.scalar_type() == at::kFloat && gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat,
              "silu_mul: float32");
  const int64_t T = out.size(0), I = out.size(1);
  float* o = out.data_ptr<float>();
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  const int64_t lo_ = out.stride(0), lg = gate.stride(0), lu = up.stride(0);
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      int64_t i = 0;
      for (; i + kLanes <= I; i += kLanes) {  // the CPU's own vector width: see vec16.h
        const vec x = load_vec(g + t * lg + i);
        const vec nx = -x;
        const vec e = loraplex::vexp(nx < 88.f ? nx : vec{} + 88.f);  // no overflow; exp(88) ~ 1.6e38
        loraplex::store_vec(o + t * lo_ + i, x / (1.f + e) * load_vec(u + t * lu + i));
      }
      for (; i < I; ++i) {
        const float x = g[t * lg + i];
        o[t * lo_ + i] = x / (1.f + std::exp(-x)) * u[t * lu + i];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex_decoder_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate, Tensor up) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex_decoder_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
}
