// fp32 linear y = x @ W^T (+ bias) on CPU, with W packed once into column panels.
//
// Why our own: a decode step's GEMMs have few rows (the batch) and weights far larger than the
// caches, so each weight streams from DRAM once per step. oneDNN's packed linear (the fallback,
// server/model/cpu_linear.py) leaves that stream to the hardware prefetcher and, measured on the
// development machine (AMD EPYC, 2 cores, AVX-512), reaches 355 GFLOP/s over a bench model's step of
// 33 GEMMs at 32 rows against a 509 GFLOP/s peak; this kernel 460-490, at every row count measured
// (1 to 1024), because each thread prefetches its next panel into L2 while it computes the current
// one, spread over the k loop, so the DRAM reads overlap the FMAs instead of stalling them.
//
// Layout: W [N, K] packs into ceil(N / 32) panels of [K, 32] (the panel's 32 output columns of
// each input row contiguous; columns past N are zero). A thread takes whole panels; for each panel
// it runs the rows in blocks of up to 12, each block's 12 x 32 outputs in 24 AVX-512 accumulators
// (x broadcast per row, two weight vectors per k), so a panel (K x 128 bytes) is read from DRAM
// once and re-read from L2 by the other row blocks. Accumulation is fp32 in k order; results agree
// with F.linear to float rounding.
//
// Tried and dropped: also prefetching the live adapters' LoRA pages (what the LoRA op reads right
// after each GEMM) from inside the GEMM. The LoRA op's time fell (1.5 -> 0.85 ms a mixed-8 step) but
// the GEMMs slowed by as much or more (mixed / base step 1.16 without, 1.21 with, 3 alternating
// runs): two cores' outstanding misses, not idle DRAM time, bound the weight stream here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec16.h"

#include <algorithm>
#include <cstdint>

namespace {

using loraplex::load16;
using loraplex::splat;
using loraplex::v16;

constexpr int kPanel = 32;  // output columns per panel: two 16-lane vectors
constexpr int kRows = 12;   // rows per register block: 12 x 2 accumulators + 2 weight vectors

// y[m, 0:cols] = x[m] @ panel (+ bias) for m < MR; prefetches one cache line of ``next`` per k,
// lines [pf_from, pf_end), so the next panel arrives in L2 spread over this panel's compute.
template <int MR>
void block(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y,
           int64_t ldy, int cols, const char* next, int64_t pf_from, int64_t pf_end) {
  v16 acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (pf_from + k < pf_end) __builtin_prefetch(next + (pf_from + k) * 64, 0, 2);
    const v16 w0 = load16(panel + k * kPanel), w1 = load16(panel + k * kPanel + 16);
    for (int m = 0; m < MR; ++m) {
      const v16 xv = splat(x[m * ldx + k]);
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* out = y + m * ldy;
    if (bias != nullptr) {
      acc[m][0] += load16(bias);
      acc[m][1] += load16(bias + 16);
    }
    if (cols == kPanel) {
      loraplex::store16(out, acc[m][0]);
      loraplex::store16(out + 16, acc[m][1]);
    } else {  // the last panel of an N that is not a multiple of 32
      for (int j = 0; j < cols; ++j) out[j] = j < 16 ? acc[m][0][j] : acc[m][1][j - 16];
    }
  }
}

template <int MR>
void block_upto(int rows, const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias,
                float* y, int64_t ldy, int cols, const char* next, int64_t pf_from, int64_t pf_end) {
  if constexpr (MR == 1) {
    block<1>(x, ldx, panel, K, bias, y, ldy, cols, next, pf_from, pf_end);
  } else if (rows == MR) {
    block<MR>(x, ldx, panel, K, bias, y, ldy, cols, next, pf_from, pf_end);
  } else {
    block_upto<MR - 1>(rows, x, ldx, panel, K, bias, y, ldy, cols, next, pf_from, pf_end);
  }
}

// x [M, K] (rows contiguous, any row stride), packed [P, K, 32], bias [P * 32] or none, y [M, N].
void linear_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel,
              "linear_cpu: x [M, K], y [M, N], packed [P, K, 32]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "linear_cpu: float32 only");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && packed.is_contiguous(), "linear_cpu: contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && y.size(0) == M && (N + kPanel - 1) / kPanel == P, "linear_cpu: shapes disagree");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {  // padded to whole panels at pack time: every load in bounds
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == P * kPanel && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(), "linear_cpu: bias [P * 32] (pack_bias)");
    bp = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0), panel_floats = K * kPanel;
  const int64_t panel_lines = panel_floats * 4 / 64;
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float* panel = wp + p * panel_floats;
      const char* next = reinterpret_cast<const char*>(panel + panel_floats);
      const int64_t pf_end = p + 1 < hi ? panel_lines : 0;  // this thread's next panel only
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
      const float* pb = bp == nullptr ? nullptr : bp + p * kPanel;
      int64_t pf_from = 0;
      for (int64_t m0 = 0; m0 < M; m0 += kRows, pf_from += K) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
        block_upto<kRows>(rows, xp + m0 * ldx, ldx, panel, K, pb, yp + m0 * ldy + p * kPanel, ldy, cols, next,
                          pf_from, pf_end);
      }
    }
  });
}

// W [N, K] -> [ceil(N / 32), K, 32], zero past N.
at::Tensor pack_linear_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear_cpu: float32 W [N, K]");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  auto padded = at::zeros({P * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();
}

}  // namespace

TORCH_LIBRARY(loraplex_linear_cpu, m) {
  m.def("linear(Tensor(a!) y, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("pack(Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex_linear_cpu, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("pack", &pack_linear_cpu);
}
