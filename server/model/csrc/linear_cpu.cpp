// Linear y = x @ W^T (+ bias) on CPU, fp32 or bf16, with W packed once into column panels.
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
// Without AVX-512 (AVX2 + FMA: 16 registers of 8 lanes) the same panels run as two 16-column
// slices, each in blocks of up to 6 rows: 6 x 2 accumulators, two weight vectors and one broadcast
// (the classic 6 x 16 AVX2 micro-kernel); the 12 x 32 block would need 48 registers and spill
// (measured on an AVX2-only EPYC: 12.4 ms for a 32 x 512 -> 1408 linear against oneDNN's 0.45).
//
// bf16 (where the CPU has avx512_bf16): panels of [ceil(K / 2), 32, 2], k pairs adjacent, so one
// vdpbf16ps multiplies a broadcast pair of x by a pair of each of 16 columns and adds both products
// into fp32 accumulators; the bias is added in fp32 and the result rounded to bf16 once, as oneDNN's
// bf16 linear does. A panel step (one k in fp32, one k pair in bf16) is 128 bytes either way.
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
#include <cstring>
#include <string>
#include <type_traits>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using loraplex::v16;
using BF16 = c10::BFloat16;

constexpr int kPanel = 32;  // output columns per panel
constexpr int kStepBytes = 128;  // one panel step: 32 fp32 columns of one k, or 32 bf16 column pairs

// The register block: kRows rows x two vectors of kLanes columns (a slice of the panel), in the
// CPU's own vector width (vec16.h's vec: 16 lanes with AVX-512, else 8).
using loraplex::broadcast;
using loraplex::load_vec;
using loraplex::store_vec;
using loraplex::vec;
constexpr int kLanes = loraplex::kVecLanes;
#if defined(__AVX512F__)
constexpr int kRows = 12;  // 12 x 2 accumulators + 2 weight vectors of 32 registers
constexpr const char* kVariant = "avx512";
#else
constexpr int kRows = 6;  // 6 x 2 accumulators + 2 weight vectors + 1 broadcast of 16
#if defined(__AVX2__) && defined(__FMA__)
constexpr const char* kVariant = "avx2";
#else
constexpr const char* kVariant = "generic";  // plain vector code: correct, not tuned for any CPU
#endif
#endif
constexpr int kSliceCols = 2 * kLanes;  // columns of one register block: 32 with AVX-512, else 16
constexpr int kSlices = kPanel / kSliceCols;

// Where a row block prefetches the thread's next panel: lines [from, end) of ``next``, PS of them
// per step (PS: a template argument, so the step loop carries no loop of its own).
struct Prefetch {
  const char* next;
  int64_t from, end;
};

template <int PS>
inline void prefetch_step(const char* next, int64_t from, int64_t end, int64_t s) {
  for (int i = 0; i < PS; ++i) {
    const int64_t line = from + s * PS + i;
    if (line < end) __builtin_prefetch(next + line * 64, 0, 2);
  }
}

template <int MR, typename T>  // inlined, so the accumulators stay registers (an escaping array would not)
__attribute__((always_inline)) inline void store_rows(vec (&acc)[MR][2], const T* bias, T* y, int64_t ldy, int cols) {
  for (int m = 0; m < MR; ++m) {
    T* out = y + m * ldy;
    if (bias != nullptr) {
      acc[m][0] += load_vec(bias);
      acc[m][1] += load_vec(bias + kLanes);
    }
    if (cols == kSliceCols) {
      store_vec(out, acc[m][0]);
      store_vec(out + kLanes, acc[m][1]);
    } else {  // the last panel of an N that is not a multiple of 32
      for (int j = 0; j < cols; ++j) out[j] = static_cast<T>(j < kLanes ? acc[m][0][j] : acc[m][1][j - kLanes]);
    }
  }
}

// y[m, 0:cols] = x[m] @ slice (+ bias) for m < MR, fp32 (``panel``: the slice's first column, rows
// kPanel apart); prefetching the next panel as ``pf`` says, so it arrives in L2 spread over this
// panel's compute.
template <int MR, int PS>
void block(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y,
           int64_t ldy, int cols, Prefetch pf) {
  const char* next = pf.next;  // scalars, not a struct in memory, inside the loop
  const int64_t from = pf.from, end = pf.end;
  vec acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    prefetch_step<PS>(next, from, end, k);
    const vec w0 = load_vec(panel + k * kPanel), w1 = load_vec(panel + k * kPanel + kLanes);
    for (int m = 0; m < MR; ++m) {
      const vec xv = broadcast(x + m * ldx + k);
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  store_rows<MR>(acc, bias, y, ldy, cols);
}

#if defined(__AVX512BF16__)
constexpr bool kHasBf16 = true;

inline v16 as_v16(__m512 v) { v16 r; std::memcpy(&r, &v, sizeof r); return r; }

// The bf16 block: ``panel`` [ceil(K / 2), 32, 2]; fp32 accumulators, one rounding at the store.
template <int MR, int PS>
void block(const BF16* x, int64_t ldx, const BF16* panel, int64_t K, const BF16* bias, BF16* y,
           int64_t ldy, int cols, Prefetch pf) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const char* next = pf.next;
  const int64_t from = pf.from, end = pf.end, pairs = K / 2;
  for (int64_t s = 0; s < pairs; ++s) {
    prefetch_step<PS>(next, from, end, s);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + s * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + s * 2 * kPanel + kPanel);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;  // x[2s], x[2s + 1]
      std::memcpy(&pair, x + m * ldx + 2 * s, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
    }
  }
  if (K % 2) {  // the last k alone: its pair's second half is zero in the panel, and 0 here
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + pairs * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + pairs * 2 * kPanel + kPanel);
    for (int m = 0; m < MR; ++m) {
      uint16_t last;
      std::memcpy(&last, x + m * ldx + K - 1, sizeof last);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
    }
  }
  v16 out[MR][2];
  for (int m = 0; m < MR; ++m) {
    out[m][0] = as_v16(acc[m][0]);
    out[m][1] = as_v16(acc[m][1]);
  }
  store_rows<MR>(out, bias, y, ldy, cols);
}
#else
constexpr bool kHasBf16 = false;
#endif

template <int MR, int PS, typename T>
void block_upto(int rows, const T* x, int64_t ldx, const T* panel, int64_t K, const T* bias, T* y, int64_t ldy,
                int cols, const Prefetch& pf) {
  if constexpr (MR == 1) {
    block<1, PS>(x, ldx, panel, K, bias, y, ldy, cols, pf);
  } else if (rows == MR) {
    block<MR, PS>(x, ldx, panel, K, bias, y, ldy, cols, pf);
  } else {
    block_upto<MR - 1, PS>(rows, x, ldx, panel, K, bias, y, ldy, cols, pf);
  }
}

template <typename T>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& packed, const T* bias, const at::Tensor* next) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), P = packed.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = packed.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0), panel_elems = packed.stride(0);
  const int64_t steps = std::is_same_v<T, float> ? K : (K + 1) / 2;
  const int64_t panel_lines = steps * kStepBytes / 64, blocks = (M + kRows - 1) / kRows;
  // two lines a step (a whole step) when one block pass must bring in all of the next panel, else one
  const int per_step = blocks * kSlices == 1 ? 2 : 1;
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* panel = wp + p * panel_elems;
      Prefetch pf{reinterpret_cast<const char*>(panel + panel_elems), 0, p + 1 < hi ? panel_lines : 0};
      if (p + 1 == hi && next != nullptr) {  // the last panel: prefetch this thread's first of the next linear
        const int64_t np = next->size(0), first = np * lo / P;
        const int64_t bytes = next->stride(0) * next->element_size();
        pf = {static_cast<const char*>(next->data_ptr()) + first * bytes, 0, first < np ? bytes / 64 : 0};
      }
      for (int s = 0; s < kSlices; ++s) {
        const int64_t c0 = p * kPanel + s * kSliceCols;  // the slice's first output column
        if (c0 >= N) break;
        const int cols = static_cast<int>(std::min<int64_t>(kSliceCols, N - c0));
        const T* slice = panel + s * kSliceCols * (std::is_same_v<T, float> ? 1 : 2);
        const T* sb = bias == nullptr ? nullptr : bias + c0;
        for (int64_t b = 0; b < blocks; ++b, pf.from += steps * per_step) {
          // balanced: 32 rows as 11 + 11 + 10 (not 12 + 12 + 8), or 6 + 5 + 5 + 6 + 5 + 5
          const int64_t m0 = b * M / blocks;
          const int rows = static_cast<int>((b + 1) * M / blocks - m0);
          const T* xb = xp + m0 * ldx;
          T* yb = yp + m0 * ldy + c0;
          if (per_step == 2) {
            block_upto<kRows, 2>(rows, xb, ldx, slice, K, sb, yb, ldy, cols, pf);
          } else {
            block_upto<kRows, 1>(rows, xb, ldx, slice, K, sb, yb, ldy, cols, pf);
          }
        }
      }
    }
  });
}

// x [M, K] (rows contiguous, any row stride), packed (pack_linear_cpu), bias [P * 32] or none, y [M, N];
// one dtype, float32 or (has_bf16()) bfloat16.
// next: the packed weight of the linear that runs next (or none): each thread's last panel prefetches
// the first panel it will take there, over the ops that run in between (a hint, never read here).
void linear_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& next) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || (dtype == at::kBFloat16 && kHasBf16), "linear_cpu: float32, or bfloat16 with avx512_bf16");
  TORCH_CHECK(y.scalar_type() == dtype && packed.scalar_type() == dtype, "linear_cpu: one dtype");
  const int64_t steps = dtype == at::kFloat ? x.size(1) : (x.size(1) + 1) / 2, width = dtype == at::kFloat ? 1 : 2;
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && packed.dim() == 4 && packed.size(1) == steps &&
                  packed.size(2) == kPanel && packed.size(3) == width && packed.is_contiguous(),
              "linear_cpu: x [M, K], y [M, N], packed [P, K, 32, 1] (fp32) or [P, ceil(K / 2), 32, 2] (bf16)");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "linear_cpu: contiguous rows");
  const int64_t M = x.size(0), N = y.size(1), P = packed.size(0);
  TORCH_CHECK(y.size(0) == M && (N + kPanel - 1) / kPanel == P, "linear_cpu: shapes disagree");
  const void* bp = nullptr;
  if (bias.has_value() && bias->defined()) {  // padded to whole panels at pack time: every load in bounds
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == P * kPanel && bias->scalar_type() == dtype &&
                    bias->is_contiguous(), "linear_cpu: bias [P * 32] (padded)");
    bp = bias->data_ptr();
  }
  if (M == 0 || N == 0) return;
  const at::Tensor* np = nullptr;
  if (next.has_value() && next->defined()) {
    TORCH_CHECK(next->dim() == 4 && next->is_contiguous() && next->size(0) > 0, "linear_cpu: next: packed panels");
    np = &*next;
  }
  if (dtype == at::kFloat) {
    run<float>(y, x, packed, static_cast<const float*>(bp), np);
  } else {
#if defined(__AVX512BF16__)
    run<BF16>(y, x, packed, static_cast<const BF16*>(bp), np);
#endif
  }
}

// W [N, K] -> fp32 [ceil(N / 32), K, 32, 1], or bf16 [ceil(N / 32), ceil(K / 2), 32, 2]; zero past N and K.
at::Tensor pack_linear_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "pack_linear_cpu: float32 or bfloat16 W [N, K]");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  const int64_t width = w.scalar_type() == at::kFloat ? 1 : 2, steps = (K + width - 1) / width;
  auto padded = at::zeros({P * kPanel, steps * width}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  return padded.view({P, kPanel, steps, width}).permute({0, 2, 1, 3}).contiguous();
}

bool has_bf16() { return kHasBf16; }

// Which register blocking this build has: "avx512", "avx2", or "generic" (neither: not tuned).
std::string variant() { return kVariant; }

}  // namespace

TORCH_LIBRARY(loraplex_linear_cpu, m) {
  m.def("linear(Tensor(a!) y, Tensor x, Tensor packed, Tensor? bias, Tensor? next=None) -> ()");
  m.def("pack(Tensor w) -> Tensor");
  m.def("has_bf16() -> bool", &has_bf16);
  m.def("variant() -> str", &variant);
}

TORCH_LIBRARY_IMPL(loraplex_linear_cpu, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("pack", &pack_linear_cpu);
}
