// SGMV on CPU: every LoRA row's shrink and expand in one call, for one linear or a fused group.
//
// Semantics (server/lora/ops/sgmv_torch.py is the reference): for grouped row i (batch row
// rows[i]) with slot s = slots[i], and member j of K:
//     t_j[q]            = x[row] @ a[page(s, q / 16), :, j, q % 16]     a: [P, I, K, 16]
//     y[row, cols_j]   += sum_q t_j[q] * b[page(s, q / 16), q % 16, cols_j]   b: [P, 16, O]
// over q < r = slot_ranks[s], the slot's own rank (the largest of its members', a multiple of 16;
// ranks past a member's own are zero), with page(s, k) = page_table[s, k]: adapters own pages of one
// rank block each (server/lora/slot_weights.py), wherever the pages sit. A rank block a[p] is one
// contiguous [I, K * 16] matrix, so one shrink serves the whole group and reads only the slot's
// r / 16 pages: per-slot ranks are honoured, nothing is padded to max_lora_rank. Members the slot
// does not target (slot_members: k of a q/v adapter) are skipped in both passes: their 16 ranks
// of an A row are one vector the shrink does not load, their B columns are not read. Each page of a
// and b is contiguous; pages may sit at any stride (server/lora/slot_rows.py lays every target's
// block of one page out as one row).
//
// Rows run in blocks of up to 4 rows of one slot, so each A and B row is loaded once per block and
// reused from registers; register tiles are 4 rows x 64 columns of fp32 (16 AVX-512 registers, or
// their equivalent elsewhere: GCC vector extensions, compiled for the host CPU). bf16 inputs are
// widened on load and rounded on store; accumulation is fp32. The weights a and b may be narrower
// than x and y (W: bf16 or fp16 slots under an fp32 model, Settings.lora_dtype): a decode step's
// LoRA time is mostly streaming them from DRAM, and half-width weights halve those bytes (measured,
// a mixed-8 step's 32 calls alone: 0.68 ms fp32, 0.49 ms fp16/bf16). Blocks run in parallel on
// torch's intra-op thread pool (the same OpenMP runtime torch uses).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec16.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using loraplex::load16;
using loraplex::to_float;
using loraplex::v16;

constexpr int kRows = 4;  // rows per block (all of one slot)
#if defined(__AVX512F__)
constexpr int kVecs = 4;  // 16-wide vectors per column tile
constexpr int kChains = 8;  // independent FMA chains the shrink keeps in flight
#else
// Without AVX-512 each 16-wide vector is two or four registers of a 16-register file: one vector
// per tile and half the chains, or the tiles spill (measured on an AVX2-only EPYC, a mixed-8 step of
// the bench model: 53-59 ms with 4 vectors and 8 chains, 45.5-47.9 with these; docs/benchmarks.md).
constexpr int kVecs = 1;
constexpr int kChains = 4;
#endif
constexpr int kAheadRows = 16;  // shrink: software prefetch distance, in rows of A
constexpr int kMaxMembers = 16;  // members of one fused group (q/k/v: 3)

template <typename T>
inline void add_store(T* p, v16 v) { loraplex::store16(p, load16(p) + v); }

// t[m, off[v] : off[v] + 16] = x[rows[m]] @ a_blk[:, off[v] : ...] for m < MB and v < NV (one tile of
// NV vectors: one member's 16 ranks each, at column offset off[v] of the block). NV is a template
// argument so a narrow tile (a single linear's 16 ranks: NV = 1) runs only its own FMAs, and the
// input dimension is split over U interleaved accumulator sets so at least 8 independent FMA chains
// are in flight (FMA latency x throughput) however few rows there are.
template <int MB, int NV, typename T, typename W>
void shrink_tile(const T* x, int64_t ldx, const int64_t* rows, const W* a_blk, int64_t I, int64_t lda,
                 const int64_t* off, float* t, int64_t ldt) {
  constexpr int U = MB * NV >= kChains ? 1 : (2 * MB * NV >= kChains ? 2 : 4);
  v16 acc[U][MB][NV] = {};
  const T* xr[MB];
  for (int m = 0; m < MB; ++m) xr[m] = x + rows[m] * ldx;
  int64_t c = 0;
  for (; c + U <= I; c += U)
    for (int u = 0; u < U; ++u) {
      const W* arow = a_blk + (c + u) * lda;
      for (int v = 0; v < NV; ++v) __builtin_prefetch(arow + kAheadRows * lda + off[v]);
      v16 av[NV];
      for (int v = 0; v < NV; ++v) av[v] = load16(arow + off[v]);
      for (int m = 0; m < MB; ++m) {
        const float xv = to_float(xr[m][c + u]);
        for (int v = 0; v < NV; ++v) acc[u][m][v] += xv * av[v];
      }
    }
  for (; c < I; ++c) {
    const W* arow = a_blk + c * lda;
    for (int m = 0; m < MB; ++m) {
      const float xv = to_float(xr[m][c]);
      for (int v = 0; v < NV; ++v) acc[0][m][v] += xv * load16(arow + off[v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) {
      v16 sum = acc[0][m][v];
      for (int u = 1; u < U; ++u) sum += acc[u][m][v];
      loraplex::store16(t + m * ldt + off[v], sum);
    }
}

// The shrink of one rank block [I, K * 16] for the members whose column offsets are off[:n] (the
// members a slot has: the others' ranks are zero and are never read).
template <int MB, typename T, typename W>
void shrink_block(const T* x, int64_t ldx, const int64_t* rows, const W* a_blk, int64_t I, int64_t bk,
                  const int64_t* off, int n, float* t, int64_t ldt) {
  for (int v0 = 0; v0 < n; v0 += kVecs) {
    switch (std::min(kVecs, n - v0)) {
      case 1: shrink_tile<MB, 1>(x, ldx, rows, a_blk, I, bk, off + v0, t, ldt); break;
      case 2: shrink_tile<MB, 2>(x, ldx, rows, a_blk, I, bk, off + v0, t, ldt); break;
      case 3: shrink_tile<MB, 3>(x, ldx, rows, a_blk, I, bk, off + v0, t, ldt); break;
      default: shrink_tile<MB, 4>(x, ldx, rows, a_blk, I, bk, off + v0, t, ldt);
    }
  }
}

// y[rows[m], o0 : o0 + 16 * nv] += tj[m, :r] @ b_slot[:r, o0 : ...] for m < MB
template <int MB, typename T, typename W>
void expand_tile(T* y, int64_t ldy, const int64_t* rows, const W* const* b_pages, int64_t ldb, const float* tj,
                 int64_t r, int64_t o0, int nv) {
  v16 acc[MB][kVecs] = {};
  for (int64_t q = 0; q < r; ++q) {
    const W* brow = b_pages[q / 16] + (q % 16) * ldb + o0;
    // The next column tile's part of this row: B's rows sit a whole output width apart, so the
    // hardware prefetcher does not follow a tile walk; without it the expand waits on DRAM.
    for (int v = 0; v < kVecs; ++v) __builtin_prefetch(brow + 16 * (kVecs + v));
    v16 bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = v < nv ? load16(brow + 16 * v) : v16{};
    for (int m = 0; m < MB; ++m) {
      const float tv = tj[m * r + q];
      for (int v = 0; v < kVecs; ++v) acc[m][v] += tv * bv[v];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < nv; ++v) add_store(y + rows[m] * ldy + o0 + 16 * v, acc[m][v]);
}

template <int MB, typename T, typename W>
void block(T* y, int64_t ldy, const T* x, int64_t ldx, const W* const* a_pages, const W* const* b_pages,
           int64_t I, int64_t K, int64_t O, const int64_t* cols, const int64_t* rows, int64_t r,
           int64_t members, float* t, float* tj) {
  const int64_t rk = r * K, bk = 16 * K;  // t columns like a rank block's: blocks, then members, then 16 ranks
  int64_t off[kMaxMembers];
  int n = 0;
  for (int64_t j = 0; j < K; ++j)
    if (members >> j & 1) off[n++] = 16 * j;
  for (int64_t blk = 0; blk < r / 16; ++blk) shrink_block<MB>(x, ldx, rows, a_pages[blk], I, bk, off, n, t + blk * bk, rk);
  for (int64_t j = 0; j < K; ++j) {
    if (!(members >> j & 1)) continue;  // a member without ranks in this slot adds nothing
    for (int m = 0; m < MB; ++m)
      for (int64_t q = 0; q < r; ++q) tj[m * r + q] = t[m * rk + (q / 16) * bk + 16 * j + q % 16];
    const int64_t end = cols[j + 1], vec_end = cols[j] + (end - cols[j]) / 16 * 16;
    for (int64_t o0 = cols[j]; o0 < vec_end; o0 += 16 * kVecs)
      expand_tile<MB>(y, ldy, rows, b_pages, O, tj, r, o0, (int)std::min<int64_t>(kVecs, (vec_end - o0) / 16));
    for (int m = 0; m < MB; ++m)  // a column tail that is not a multiple of 16
      for (int64_t o = vec_end; o < end; ++o) {
        float acc = 0.f;
        for (int64_t q = 0; q < r; ++q) acc += tj[m * r + q] * to_float(b_pages[q / 16][(q % 16) * O + o]);
        T* out = y + rows[m] * ldy + o;
        *out = T(to_float(*out) + acc);
      }
  }
}

template <typename T, typename W>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const std::vector<int64_t>& cols, const int64_t* rows, const int64_t* slots, int64_t nrows,
         const int64_t* page_table, int64_t nb, const int64_t* slot_ranks, const int64_t* slot_members) {
  const int64_t I = a.size(1), K = a.size(2), O = b.size(2);
  std::vector<int64_t> starts;  // blocks: runs of at most kRows grouped rows sharing a slot
  for (int64_t i = 0; i < nrows; ++i)
    if (starts.empty() || slots[i] != slots[i - 1] || i - starts.back() == kRows) starts.push_back(i);
  const int64_t nblocks = starts.size();
  starts.push_back(nrows);
  T* yp = y.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const W* ap = a.data_ptr<W>();
  const W* bp = b.data_ptr<W>();
  const int64_t ldy = y.stride(0), ldx = x.stride(0), a_page_stride = a.stride(0), b_page_stride = b.stride(0);
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> t(kRows * nb * 16 * K), tj(kRows * nb * 16);
    std::vector<const W*> a_pages(nb), b_pages(nb);
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t s = starts[blk], n = starts[blk + 1] - s, slot = slots[s];
      if (slot < 0) continue;  // base-model rows (static steps list every row)
      const int64_t r = slot_ranks[slot];
      if (r == 0) continue;
      for (int64_t k = 0; k < r / 16; ++k) {
        const int64_t page = page_table[slot * nb + k];
        a_pages[k] = ap + page * a_page_stride;
        b_pages[k] = bp + page * b_page_stride;
      }
      const W* const* pa = a_pages.data();
      const W* const* pb = b_pages.data();
      const int64_t* rp = rows + s;
      const int64_t mem = slot_members[slot];
      switch (n) {
        case 1: block<1>(yp, ldy, xp, ldx, pa, pb, I, K, O, cols.data(), rp, r, mem, t.data(), tj.data()); break;
        case 2: block<2>(yp, ldy, xp, ldx, pa, pb, I, K, O, cols.data(), rp, r, mem, t.data(), tj.data()); break;
        case 3: block<3>(yp, ldy, xp, ldx, pa, pb, I, K, O, cols.data(), rp, r, mem, t.data(), tj.data()); break;
        default: block<4>(yp, ldy, xp, ldx, pa, pb, I, K, O, cols.data(), rp, r, mem, t.data(), tj.data());
      }
    }
  });
}

// y [N, O] and x [N, I] with contiguous rows, a [P, I, K, 16], b [P, 16, O] (pages); cols: the K + 1
// column bounds of the members; rows, slots (int64 [M]): each grouped row's batch row and slot (-1:
// a base row, skipped), rows of a slot consecutive; page_table (int64 [S, R/16]): the page of each
// slot's rank block; slot_ranks (int64 [S]): each slot's rank; slot_members (int64 [S]): bit j set
// where member j has ranks in the slot (the others are zero: skipped).
void sgmv_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
              std::vector<int64_t> cols, const at::Tensor& rows, const at::Tensor& slots,
              const at::Tensor& page_table, const at::Tensor& slot_ranks, const at::Tensor& slot_members) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 4 && b.dim() == 3 && a.size(3) == 16 && b.size(1) == 16,
              "sgmv_cpu: a [P, I, K, 16], b [P, 16, O], x [N, I], y [N, O]");
  TORCH_CHECK(a.size(2) <= kMaxMembers, "sgmv_cpu: at most 16 members");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "sgmv_cpu: rows of x and y must be contiguous");
  TORCH_CHECK(a.stride(3) == 1 && a.stride(2) == 16 && a.stride(1) == 16 * a.size(2) && b.stride(2) == 1 &&
                  b.stride(1) == b.size(2), "sgmv_cpu: each page of a and b must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == b.scalar_type(),
              "sgmv_cpu: one dtype for x and y, one for a and b");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.is_contiguous() &&
                  slots.is_contiguous() && rows.numel() == slots.numel(), "sgmv_cpu: rows, slots: int64 [M]");
  TORCH_CHECK((int64_t)cols.size() == a.size(2) + 1 && cols.front() == 0 && cols.back() == b.size(2),
              "sgmv_cpu: column bounds");
  for (size_t j = 1; j < cols.size(); ++j) TORCH_CHECK(cols[j] >= cols[j - 1], "sgmv_cpu: column bounds");
  TORCH_CHECK(a.size(0) == b.size(0) && x.size(1) == a.size(1) && y.size(1) == b.size(2),
              "sgmv_cpu: shapes of x, y, a, b disagree");
  TORCH_CHECK(page_table.scalar_type() == at::kLong && page_table.dim() == 2 && page_table.is_contiguous(),
              "sgmv_cpu: page_table: int64 [S, R/16]");
  const int64_t S = page_table.size(0), nb = page_table.size(1);
  const int64_t* pt = page_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < S * nb; ++i) TORCH_CHECK(pt[i] >= 0 && pt[i] < a.size(0), "sgmv_cpu: page out of range");
  TORCH_CHECK(slot_ranks.scalar_type() == at::kLong && slot_ranks.is_contiguous() && slot_ranks.numel() == S &&
                  slot_members.scalar_type() == at::kLong && slot_members.is_contiguous() &&
                  slot_members.numel() == S, "sgmv_cpu: slot_ranks, slot_members: int64 [S]");
  const int64_t* mp = slot_members.data_ptr<int64_t>();
  const int64_t* kp = slot_ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(kp[i] >= 0 && kp[i] <= nb * 16 && kp[i] % 16 == 0, "sgmv_cpu: slot ranks: multiples of 16 <= R");
  const int64_t n = rows.numel();
  if (n == 0) return;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < y.size(0) && rp[i] < x.size(0) && sp[i] >= -1 && sp[i] < S,
                "sgmv_cpu: row or slot out of range");
  const auto xt = y.scalar_type(), wt = a.scalar_type();
  if (xt == at::kFloat && wt == at::kFloat) {
    run<float, float>(y, x, a, b, cols, rp, sp, n, pt, nb, kp, mp);
  } else if (xt == at::kFloat && wt == at::kBFloat16) {
    run<float, c10::BFloat16>(y, x, a, b, cols, rp, sp, n, pt, nb, kp, mp);
  } else if (xt == at::kFloat && wt == at::kHalf) {
    run<float, c10::Half>(y, x, a, b, cols, rp, sp, n, pt, nb, kp, mp);
  } else {
    TORCH_CHECK(xt == at::kBFloat16 && wt == at::kBFloat16,
                "sgmv_cpu: float32 x/y with float32, bfloat16 or float16 weights, or bfloat16 throughout");
    run<c10::BFloat16, c10::BFloat16>(y, x, a, b, cols, rp, sp, n, pt, nb, kp, mp);
  }
}

}  // namespace

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def("sgmv(Tensor(a!) y, Tensor x, Tensor a, Tensor b, int[] cols, Tensor rows, Tensor slots, Tensor page_table, Tensor slot_ranks, Tensor slot_members) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex_cpu, CPU, m) { m.impl("sgmv", &sgmv_cpu); }
