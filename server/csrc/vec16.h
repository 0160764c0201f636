// 16-lane fp32 vectors for the native CPU kernels (GCC vector extensions: AVX-512 registers when
// built with -march=native on a CPU that has them, pairs or quads of narrower ones elsewhere).
// bf16 and fp16 values widen on load (exact); bf16 rounds to nearest even on store; values are finite.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace loraplex {

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16w __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));  // also what a v16 comparison yields (0 / -1 lanes)

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }

// bf16 <-> fp32 for a float vector F, with W and H its lanes as uint32 and uint16 (16 or 8 lanes):
// widening is exact, narrowing rounds to nearest even.
template <typename F, typename W, typename H>
inline F widen_bf16(const c10::BFloat16* p) {
  H h; std::memcpy(&h, p, sizeof h);
  W w = __builtin_convertvector(h, W) << 16;
  F v; std::memcpy(&v, &w, sizeof v); return v;
}

template <typename F, typename W, typename H>
inline void narrow_bf16(c10::BFloat16* p, F v) {
  W bits; std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  H h = __builtin_convertvector(bits, H);
  std::memcpy(p, &h, sizeof h);
}

inline v16 load16(const c10::BFloat16* p) { return widen_bf16<v16, v16w, v16h>(p); }

// fp16 (LoRA weights stored at half width under an fp32 model): the hardware conversion where the CPU
// has one (F16C, AVX-512), else per lane.
inline v16 load16(const c10::Half* p) {
  v16 v;
#if defined(__AVX512F__)
  const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &w, sizeof v);
#elif defined(__F16C__)
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(q)), hi = _mm256_cvtph_ps(_mm_loadu_si128(q + 1));
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
#endif
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

inline void store16(c10::BFloat16* p, v16 v) { narrow_bf16<v16, v16w, v16h>(p, v); }

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// Horizontal sum and max by halving (4 shuffles), not a serial chain of 15 scalar operations.
inline float hsum(v16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

template <typename V>
inline V vmax(V a, V b) { return a > b ? a : b; }

inline float hmax(v16 v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// x in every lane, as one broadcast (``v16{} + x`` would first add a zero to x in a scalar register:
// an extra instruction per use, which the panel GEMM's inner loop paid once per row and k).
inline v16 splat(float x) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_set1_ps(x);
  v16 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
#else
  return v16{} + x;
#endif
}

// exp(x) for x <= 88 (fp32 accuracy ~2 ulp): 2^n * 2^f, n = round(x / ln 2), 2^f by a degree-6
// polynomial on f in [-1/2, 1/2]; x below -87 gives 0. For a vector of any width (v16, vec).
template <typename V>
inline V vexp(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.f;
  x = x < lo ? lo : x;
  const V t = x * 1.44269504088896341f;
  const V n = __builtin_convertvector(__builtin_convertvector(t + (t < 0 ? V{} - 0.5f : V{} + 0.5f), VI), V);
  const V f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  V p = V{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  VI bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, VI) << 23;
  std::memcpy(&p, &bits, sizeof p);
  return x <= lo ? V{} : p;
}

// Lane i of the result is the sum of the lanes of p[i] (16 horizontal sums at the cost of ~30
// shuffles and adds, not 240 scalar adds). Pairwise folding leaves the sums in bit-reversed lane
// order, so the inputs are taken bit-reversed.
inline v16 reduce16(const v16* p) {
  static constexpr int kRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  v16 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {
    const v16 x = p[kRev[2 * k]], y = p[kRev[2 * k + 1]];
    a[k] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int k = 0; k < 4; ++k)
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)
    c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// The CPU's own vector width: 16 lanes with AVX-512, else 8 (AVX2: 16 registers of 8 lanes).
// Kernels that keep many vectors live, or fold lanes across a vector (horizontal sums and maxima,
// shuffles), are written in ``vec``: a 16-lane vector on AVX2 is a pair of registers, and GCC turns a
// 16-lane shuffle it cannot map there into per-lane moves (measured on an AVX2-only EPYC: the paged
// attention kernel in v16 ran 10x slower than in vec).
#if defined(__AVX512F__)
using vec = v16;
constexpr int kVecLanes = 16;
template <typename T>
inline vec load_vec(const T* p) { return load16(p); }
template <typename T>
inline void store_vec(T* p, vec v) { store16(p, v); }
inline vec broadcast(const float* p) { return splat(*p); }
inline float hsum_vec(vec v) { return hsum(v); }
inline float hmax_vec(vec v) { return hmax(v); }
inline vec reduce_vec(const vec* p) { return reduce16(p); }
#else
typedef float v8 __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8w __attribute__((vector_size(32)));
using vec = v8;
constexpr int kVecLanes = 8;

inline vec load_vec(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }

inline vec load_vec(const c10::BFloat16* p) { return widen_bf16<v8, v8w, v8h>(p); }
inline void store_vec(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline void store_vec(c10::BFloat16* p, vec v) { narrow_bf16<v8, v8w, v8h>(p, v); }

// One vbroadcastss from memory. (``vec{} + x`` adds a zero first; an _mm256 intrinsic copied into a
// vec made GCC keep the panel GEMM's accumulators in memory: 4x slower.)
inline vec broadcast(const float* p) {
  const float x = *p;
  return vec{x, x, x, x, x, x, x, x};
}

inline float hsum_vec(vec v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

inline float hmax_vec(vec v) {
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v[0];
}

// reduce16 for 8 lanes: lane i is the sum of the lanes of p[i] (inputs taken bit-reversed).
inline vec reduce_vec(const vec* p) {
  static constexpr int kRev[8] = {0, 4, 2, 6, 1, 5, 3, 7};
  vec a[4], b[2];
  for (int k = 0; k < 4; ++k) {
    const vec x = p[kRev[2 * k]], y = p[kRev[2 * k + 1]];
    a[k] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int k = 0; k < 2; ++k)
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 9, 3, 11, 5, 13, 7, 15);
}
#endif

}  // namespace loraplex
