// Rotary position embedding of queries and keys in place, in one call per layer, computed exactly as
// Hugging Face's apply_rotary_pos_emb does it: x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x[D/2:], x[:D/2]), every product and the sum rounded to the tensor's dtype
// (fp32: products not fused into FMAs, which would round once instead of twice).
//
// Why: the eager form is ~12 tensor ops per layer (slices, negation, concatenations, products,
// sums, for q and k) on a decode step's few rows: ~0.3 ms of a ~10 ms batch-32 step here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

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
void run(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
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
    AT_DISPATCH_CASE(at::kFloat, [&] { run<float>(q, k, cos, sin); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { run<c10::BFloat16>(q, k, cos, sin); }));
}

}  // namespace

TORCH_LIBRARY(loraplex_rope_cpu, m) { m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()"); }

TORCH_LIBRARY_IMPL(loraplex_rope_cpu, CPU, m) { m.impl("rope", &rope); }
