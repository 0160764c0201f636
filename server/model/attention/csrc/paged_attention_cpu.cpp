// Paged decode attention on CPU: every decode row of a step in one call, straight from the cache.
//
// Semantics (server/model/attention/torch_paged.py's batched SDPA is the reference): for decode row
// b (packed row rows[b], context_lens[b] keys) and query head h (KV head g = h / (H / KVH)):
//     s[t]   = scale * q[rows[b], h] . K[t, g]          for t in [first, ctx), first = ctx - window
//     s[t]   = softcap * tanh(s[t] / softcap)           when softcap > 0
//     out[rows[b], h] = softmax(s) @ V[first:ctx, g]
// where K[t] is k_cache[block_tables[b][t / BS], t % BS]. The heads that share a KV head are done
// together, so each key and value row is read once; softmax runs online per cache block (fp32).
// Work is split over (row, KV head) pairs on torch's intra-op thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using loraplex::load_vec;
using loraplex::vec;

constexpr int kLanes = loraplex::kVecLanes;  // 16 with AVX-512, else 8
constexpr int kChunk = kLanes;               // keys per chunk: one score per lane
constexpr int kMaxGroup = 16;                // query heads per KV head
constexpr int kMaxHeadDim = 256;
constexpr int kMaxVecs = kMaxHeadDim / kLanes;

// Softcapped scores: softcap * tanh(s / softcap), with tanh(y) = 1 - 2 / (exp(2y) + 1).
inline vec cap(vec s, float softcap) {
  const vec e = loraplex::vexp(s * (2.f / softcap));
  return softcap * (1.f - 2.f / (e + 1.f));
}

// The next chunk's keys and values (up to kChunk token rows of one cache block, this KV head's part),
// requested while this chunk computes: one KV head's part of a token row is a few lines a whole
// token row apart, a stride the hardware prefetcher is slow to follow, and a step's cache has left
// L3 since the last step (the base weights streamed through in between).
template <typename T>
inline void prefetch_chunk(const T* k_cache, const T* v_cache, const int32_t* table, int64_t block_size,
                           int64_t kvh, int64_t hd, int64_t g, int64_t t0, int64_t ctx) {
  const int64_t blk = table[t0 / block_size], off = t0 % block_size;
  const int64_t n = std::min<int64_t>({block_size - off, ctx - t0, kChunk}), bytes = hd * (int64_t)sizeof(T);
  const char* k = reinterpret_cast<const char*>(k_cache + ((blk * block_size + off) * kvh + g) * hd);
  const char* v = reinterpret_cast<const char*>(v_cache + ((blk * block_size + off) * kvh + g) * hd);
  const int64_t stride = kvh * bytes;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < bytes; c += 64) {
      __builtin_prefetch(k + i * stride + c);
      __builtin_prefetch(v + i * stride + c);
    }
}

// One (decode row, KV head): the `group` query heads sharing KV head g, over keys [first, ctx), in
// chunks of up to kChunk keys of one cache block (the vector width: 16 with AVX-512, 8 with AVX2).
// Per chunk and head: kChunk dot products as partial vectors folded into one vector of scores
// (reduce_vec), the online-softmax update on that vector, then the weighted values. The chunk's keys
// and values are re-read per head from L1, which keeps the live registers to one head's query,
// partial sums and accumulator.
//
// NV: head_dim / kLanes as a compile-time constant for the common head sizes (64, 128), so the loops
// over a head's vectors unroll and its query, partial sums and accumulator stay in registers; 0:
// any other size, counted at run time. Measured (head_dim 64, 4 query heads per KV head, 32 rows x
// 96 keys, one layer; AVX-512): 85 -> 57 us with the cache in L2/L3, 166 -> 118 us cold; prefetching
// the next chunk (and the next pair's first) took cold to 108 us.
template <typename T, int NV>
void attend(T* out, const T* q, int64_t q_row_stride, int64_t q_head_stride, const T* k_cache, const T* v_cache,
            int64_t block_size, int64_t kvh, int64_t hd, const int32_t* table, int64_t ctx, int64_t row,
            int64_t g, int64_t group, float scale, float softcap, int64_t window, int64_t out_row_stride,
            int64_t out_head_stride) {
  const int nv = NV > 0 ? NV : hd / kLanes;
  vec qv[kMaxGroup][kMaxVecs], acc[kMaxGroup][kMaxVecs];
  alignas(64) float kf[kChunk * kMaxHeadDim], vf[kChunk * kMaxHeadDim];  // a bf16 chunk, widened
  float m[kMaxGroup], l[kMaxGroup];
  for (int h = 0; h < group; ++h) {
    const T* qh = q + row * q_row_stride + (g * group + h) * q_head_stride;
    for (int v = 0; v < nv; ++v) { qv[h][v] = load_vec(qh + kLanes * v) * scale; acc[h][v] = vec{}; }
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
  const int64_t tok_stride = kvh * hd;
  for (int64_t t0 = first; t0 < ctx;) {
    const int64_t blk = table[t0 / block_size], off = t0 % block_size;
    const int n = (int)std::min<int64_t>({block_size - off, ctx - t0, kChunk});
    const T* kt = k_cache + ((blk * block_size + off) * kvh + g) * hd;
    const T* vt = v_cache + ((blk * block_size + off) * kvh + g) * hd;
    if (t0 + n < ctx) prefetch_chunk(k_cache, v_cache, table, block_size, kvh, hd, g, t0 + n, ctx);
    // The chunk's keys and values in fp32, read by every head of the group: a bf16 cache is widened
    // here once per chunk instead of once per head; an fp32 cache is read in place.
    const float *kb = nullptr, *vb = nullptr;
    int64_t ld = tok_stride;
    if constexpr (std::is_same_v<T, float>) {
      kb = kt;
      vb = vt;
    } else {
      for (int i = 0; i < n; ++i)
        for (int v = 0; v < nv; ++v) {
          loraplex::store_vec(kf + i * hd + kLanes * v, load_vec(kt + i * tok_stride + kLanes * v));
          loraplex::store_vec(vf + i * hd + kLanes * v, load_vec(vt + i * tok_stride + kLanes * v));
        }
      kb = kf;
      vb = vf;
      ld = hd;
    }
    for (int h = 0; h < group; ++h) {
      vec qh[kMaxVecs];  // this head's query in registers (qv is indexed by a run-time head)
      for (int v = 0; v < nv; ++v) qh[v] = qv[h][v];
      vec part[kChunk];
      for (int i = 0; i < n; ++i) {
        vec d{};
        for (int v = 0; v < nv; ++v) d += qh[v] * load_vec(kb + i * ld + kLanes * v);
        part[i] = d;
      }
      for (int i = n; i < kChunk; ++i) part[i] = vec{};
      vec s = loraplex::reduce_vec(part);  // lane i: the score of key t0 + i
      if (softcap > 0.f) s = cap(s, softcap);
      // lanes through memory, never indexed by a run-time lane in registers (GCC then moves them
      // one by one on AVX2)
      alignas(64) float lanes[kChunk];
      if (n < kChunk) {
        loraplex::store_vec(lanes, s);
        for (int i = n; i < kChunk; ++i) lanes[i] = -std::numeric_limits<float>::infinity();
        s = load_vec(lanes);
      }
      const float mb = std::max(m[h], loraplex::hmax_vec(s));
      const float corr = std::exp(m[h] - mb);
      const vec p = loraplex::vexp(s - mb);
      l[h] = l[h] * corr + loraplex::hsum_vec(p);
      m[h] = mb;
      loraplex::store_vec(lanes, p);
      vec a[kMaxVecs];
      for (int v = 0; v < nv; ++v) a[v] = acc[h][v] * corr;
      for (int i = 0; i < n; ++i) {
        const vec pi = loraplex::broadcast(lanes + i);
        for (int v = 0; v < nv; ++v) a[v] += pi * load_vec(vb + i * ld + kLanes * v);
      }
      for (int v = 0; v < nv; ++v) acc[h][v] = a[v];
    }
    t0 += n;
  }
  for (int h = 0; h < group; ++h) {
    T* oh = out + row * out_row_stride + (g * group + h) * out_head_stride;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    for (int v = 0; v < nv; ++v) loraplex::store_vec(oh + kLanes * v, acc[h][v] * inv);
  }
}

template <typename T>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const int32_t* rows, const int32_t* tables, int64_t ld_table, const int32_t* ctx, int64_t B, int64_t kvh,
         int64_t bs, int64_t hd, int64_t group, double scale, double softcap, int64_t window) {
  T* op = out.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  at::parallel_for(0, B * kvh, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / kvh, g = i % kvh;
      if (i + 1 < hi) {  // the next pair's first chunk, while this pair computes
        const int64_t nb = (i + 1) / kvh, ng = (i + 1) % kvh;
        const int64_t first = window > 0 ? std::max<int64_t>(0, ctx[nb] - window) : 0;
        if (first < ctx[nb]) prefetch_chunk(kp, vp, tables + nb * ld_table, bs, kvh, hd, ng, first, (int64_t)ctx[nb]);
      }
      const auto attend_nv = hd == 64 ? attend<T, 64 / kLanes> : hd == 128 ? attend<T, 128 / kLanes> : attend<T, 0>;
      attend_nv(op, qp, q.stride(0), q.stride(1), kp, vp, bs, kvh, hd, tables + b * ld_table, ctx[b], rows[b], g,
                group, (float)scale, (float)softcap, window, out.stride(0), out.stride(1));
    }
  });
}

// out, q: [T, H, D] (head_dim contiguous); kv_cache: one layer's [2 (K, V), num_blocks, block_size,
// KVH, D], contiguous (the whole layer tensor, not views of it, so a compiled graph sees the same
// tensor the K/V store wrote); rows, context_lens: int32 [B]; block_tables: int32 [B, >= max
// blocks] (rows may be longer than needed: the step buffers are sized for the longest context).
void paged_decode(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& rows,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, double softcap,
                  int64_t window) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "paged_decode: kv_cache [2, num_blocks, block_size, KVH, D], contiguous");
  const at::Tensor k_cache = kv_cache[0], v_cache = kv_cache[1];
  TORCH_CHECK(out.dim() == 3 && q.dim() == 3, "paged_decode: out and q are [T, H, D]");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "paged_decode: head_dim must be contiguous");
  const int64_t H = q.size(1), hd = q.size(2), kvh = k_cache.size(2), bs = k_cache.size(1), nb = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == hd && out.size(1) == H && out.size(2) == hd && H % kvh == 0 && hd % 16 == 0 &&
                  hd <= kMaxHeadDim && H / kvh <= kMaxGroup, "paged_decode: unsupported head shapes");
  TORCH_CHECK(q.scalar_type() == out.scalar_type() && k_cache.scalar_type() == out.scalar_type() &&
                  v_cache.scalar_type() == out.scalar_type(), "paged_decode: one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kInt && block_tables.scalar_type() == at::kInt &&
                  context_lens.scalar_type() == at::kInt && rows.is_contiguous() && context_lens.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.stride(1) == 1 && block_tables.size(0) == rows.numel() &&
                  context_lens.numel() == rows.numel(), "paged_decode: int32 rows, block tables, lengths");
  const int64_t B = rows.numel(), mb = block_tables.size(1), ld_table = block_tables.stride(0);
  const int32_t* rp = rows.data_ptr<int32_t>();
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  const int32_t* cp = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < q.size(0) && rp[b] < out.size(0), "paged_decode: row out of range");
    TORCH_CHECK(cp[b] >= 0 && cp[b] <= mb * bs, "paged_decode: context beyond the block table");
    const int64_t first = window > 0 ? std::max<int64_t>(0, cp[b] - window) / bs : 0;
    for (int64_t i = first; i < (cp[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(tp[b * ld_table + i] >= 0 && tp[b * ld_table + i] < nb, "paged_decode: block out of range");
  }
  const int64_t group = H / kvh;
  AT_DISPATCH_SWITCH(out.scalar_type(), "paged_decode",
    AT_DISPATCH_CASE(at::kFloat, [&] { run<float>(out, q, k_cache, v_cache, rp, tp, ld_table, cp, B, kvh, bs, hd,
                                                   group, scale, softcap, window); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { run<c10::BFloat16>(out, q, k_cache, v_cache, rp, tp, ld_table, cp, B, kvh,
                                                             bs, hd, group, scale, softcap, window); }));
}

// K[slot_mapping[t]] = key[t], V[...] = value[t] for every row t, in one layer's kv_cache
// [2, num_blocks, block_size, KVH, D] (contiguous); key/value [T, KVH, D] with (KVH, D) contiguous;
// slot_mapping int32 [T] of flat (block * block_size + offset) slots. In place.
void store_kv(at::Tensor kv_cache, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "store_kv: kv_cache [2, num_blocks, block_size, KVH, D], contiguous");
  at::Tensor k_cache = kv_cache[0], v_cache = kv_cache[1];
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.sizes() == value.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) == k_cache.size(3) && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.stride(1) == key.size(2) && value.stride(1) == value.size(2),
              "store_kv: key/value [T, KVH, D] with (KVH, D) contiguous");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "store_kv: one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kInt && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0), "store_kv: int32 slot_mapping [T]");
  const int64_t T = key.size(0), row = key.size(1) * key.size(2), slots = k_cache.size(0) * k_cache.size(1);
  const int64_t bytes = row * key.element_size();
  const int32_t* sp = slot_mapping.data_ptr<int32_t>();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  const int64_t kstride = key.stride(0) * key.element_size(), vstride = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "store_kv: slot out of range");
    std::memcpy(kc + sp[t] * bytes, kp + t * kstride, bytes);
    std::memcpy(vc + sp[t] * bytes, vp + t * vstride, bytes);
  }
}

}  // namespace

TORCH_LIBRARY(loraplex_attention_cpu, m) {
  m.def("store_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
  m.def("paged_decode(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor rows, Tensor block_tables, "
        "Tensor context_lens, float scale, float softcap, int window) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex_attention_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("store_kv", &store_kv);
}
