// GEMV for rs::poincare_linear with 4-bit codes, group_size % 64 == 0 and an integer curv_step
// (AVX2 and F16C, which every AVX2 CPU has), for float32 activations (act_bits=0) or int8-rounded
// ones (act_bits=8).
//
// The format decodes code q of a group with scale s and curvature index c to
//   w = s u (1 + c' u^2 / 3),  u = d / 7,  d = q - 7,  c' = c * curv_step
//     = s / 1029 * (147 d + c' d^3)
// and for an integer c' the level N(q) = 147 d + c' d^3 is an integer (|N| <= 32767 for
// c' <= 61), so
//   y[r, n] = sum_g s[n,g] / 1029 * sum_k x[r,k] N_g(q[n,k]) + bias[n].
// With int8 activations x8 = round(x / sx) (rs_compile.codec.activations) the inner sum is
// sum_k x8 N, exact in int32, times sx[r,g]; with float activations it is a float sum of x N.
// Either way the result differs from x @ decode(W).T only in the rounding of float operations.
//
// Per 32 bytes of codes (64 weights; low nibbles are codes 0..31 of the chunk, high nibbles
// 32..63, the planar layout): two vpshufb per half look up the low and high byte of N from the
// group's 16-entry tables and vpunpck{l,h}bw interleave them into int16 (decode_levels). The
// activations are stored in the order the interleave produces. int8: vpmaddwd with int16
// activations, about 20 instructions per 64 weights; float: int16 -> float conversion and FMA,
// about 40; the float decode Inductor generates takes about 80.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
#endif

namespace {

inline float hsum(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_hadd_ps(t, t);
  return _mm_cvtss_f32(_mm_hadd_ps(t, t));
}

inline float hmax(__m256 v) {
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// Rounds one group of G values to int16 x8 = round(v / s), s = max|v| / 127, stored per 32 values
// in the order 0..7, 16..23, 8..15, 24..31 (what vpunpck{l,h}bw produce from the codes); returns
// s, or NaN (with zeros stored) if the group holds a NaN or inf.
float quantize_group(const float* v, int64_t G, int16_t* dst) {
  const __m256 zero = _mm256_setzero_ps(), lim = _mm256_set1_ps(127.0f);
  __m256 amax = zero, nan = zero;  // nan: sum of v * 0, which is NaN unless every v is finite
  for (int64_t i = 0; i < G; i += 8) {
    const __m256 t = _mm256_loadu_ps(v + i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), t));
    nan = _mm256_add_ps(nan, _mm256_mul_ps(t, zero));
  }
  if (!(hsum(nan) == 0.0f)) {
    std::fill(dst, dst + G, int16_t{0});
    return NAN;
  }
  const float m = hmax(amax), s = m > 0.0f ? m / 127.0f : 1.0f;
  const __m256 vs = _mm256_set1_ps(s);
  for (int64_t c = 0; c < G; c += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + c + 8 * j), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, -lim), lim));
    }
    // packs interleaves 4-value blocks of its operands per 128-bit lane; the permute restores
    // 0..7 | 16..23 and 8..15 | 24..31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[2]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(q[1], q[3]), 0xD8));
  }
  return s;
}

// Activations in the kernel's order (see quantize_group), one row after another, and one scale
// per row and group: x ~= value * scale.
template <class T>
struct Activations {
  std::vector<T> x;          // [m, ng * G]
  std::vector<float> scale;  // [m, ng]
};

// Groups run past k when G does not divide it: the last one is read from a zero-padded copy.
template <class T, class F>
Activations<T> per_group(const float* x, int64_t m, int64_t k, int64_t ng, int64_t G, F prepare) {
  Activations<T> a{std::vector<T>(m * ng * G), std::vector<float>(m * ng)};
  std::vector<float> tail(G, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* v = x + r * k + g * G;
      if ((g + 1) * G > k) {
        std::copy(v, x + (r + 1) * k, tail.begin());
        v = tail.data();
      }
      a.scale[r * ng + g] = prepare(v, G, &a.x[(r * ng + g) * G]);
    }
  }
  return a;
}

// Float activations per 32 values in the order fma16 pairs them with the levels: 0..3, 16..19,
// 4..7, 20..23, 8..11, 24..27, 12..15, 28..31; the scale 2**-16 undoes fma16's.
float permute_group(const float* v, int64_t G, float* dst) {
  for (int64_t c = 0; c < G; c += 32)
    for (int64_t i = 0; i < 8; ++i)
      std::copy_n(v + c + (i % 2) * 16 + (i / 2) * 4, 4, dst + c + 4 * i);
  return 1.0f / 65536.0f;
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Low and high bytes of N(q) = 147 (q - 7) + c (q - 7)^3, q = 0..15, in both 128-bit lanes.
struct Levels {
  __m256i low, high;
  explicit Levels(int64_t c) {
    int8_t l[16], h[16];
    for (int q = 0; q < 16; ++q) {
      const int d = q - 7, n = 147 * d + static_cast<int>(c) * d * d * d;
      l[q] = static_cast<int8_t>(n & 0xff);
      h[q] = static_cast<int8_t>(n >> 8);
    }
    low = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(l)));
    high = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  }
};

// The level tables of curvature indices 0..255 with c * curv_step <= 61, for each curv_step 0..61;
// built once.
const std::vector<Levels>& levels_for(int64_t curv_step) {
  static const auto all = [] {
    std::vector<std::vector<Levels>> t(62);
    for (int64_t step = 0; step < 62; ++step)
      for (int64_t c = 0; c < 256 && c * step <= 61; ++c) t[step].emplace_back(c * step);
    return t;
  }();
  return all[curv_step];
}

// The levels of 64 codes (32 bytes) as four vectors of 16 int16: codes 0..7 and 16..23, 8..15
// and 24..31 of the low nibbles, then the same of the high nibbles.
inline void decode_levels(const uint8_t* c, const Levels& t, __m256i n[4]) {
  const __m256i nibble = _mm256_set1_epi8(0x0f), v = load(c);
  const __m256i lo = _mm256_and_si256(v, nibble);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  __m256i l8 = _mm256_shuffle_epi8(t.low, lo), h8 = _mm256_shuffle_epi8(t.high, lo);
  n[0] = _mm256_unpacklo_epi8(l8, h8);
  n[1] = _mm256_unpackhi_epi8(l8, h8);
  l8 = _mm256_shuffle_epi8(t.low, hi);
  h8 = _mm256_shuffle_epi8(t.high, hi);
  n[2] = _mm256_unpacklo_epi8(l8, h8);
  n[3] = _mm256_unpackhi_epi8(l8, h8);
}

// One group's sum of x * N(q) in 8 lanes, over its G / 64 chunks of 32 code bytes; CH is G / 64
// when known at compile time (groups of 64 and 128 unroll), else 0. int16 activations: exact
// int32 sums.
template <int CH>
inline __m256 group_dot(const uint8_t* c, const int16_t* x, const Levels& t, int64_t G) {
  const int64_t half = CH ? 32 * CH : G / 2;
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(), n[4];
  for (int64_t j = 0; j < half; j += 32) {
    decode_levels(c + j, t, n);
    const int16_t* xl = x + j;
    const int16_t* xh = xl + half;
    s0 = _mm256_add_epi32(s0, _mm256_add_epi32(_mm256_madd_epi16(n[0], load(xl)),
                                               _mm256_madd_epi16(n[1], load(xl + 16))));
    s1 = _mm256_add_epi32(s1, _mm256_add_epi32(_mm256_madd_epi16(n[2], load(xh)),
                                               _mm256_madd_epi16(n[3], load(xh + 16))));
  }
  return _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
}

// x * (16 int16 levels n) into s[0] and s[1]: the in-lane unpack with zeros makes 32-bit lanes
// n * 2**16 (exact in float; a cheaper conversion than sign extension across lanes).
inline void fma16(__m256i n, const float* x, __m256 s[2]) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_unpacklo_epi16(zero, n));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_unpackhi_epi16(zero, n));
  s[0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), s[0]);
  s[1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 8), s[1]);
}

// Float activations: float sums (N converts exactly).
template <int CH>
inline __m256 group_dot(const uint8_t* c, const float* x, const Levels& t, int64_t G) {
  const int64_t half = CH ? 32 * CH : G / 2;
  __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256i n[4];
  for (int64_t j = 0; j < half; j += 32) {
    decode_levels(c + j, t, n);
    fma16(n[0], x + j, s);
    fma16(n[1], x + j + 16, s);
    fma16(n[2], x + half + j, s);
    fma16(n[3], x + half + j + 16, s);
  }
  return _mm256_add_ps(s[0], s[1]);
}

// This thread's share of the output rows; two groups at a time for two independent chains.
template <int CH, class T>
void rows(const Activations<T>& act, const uint8_t* codes, const uint16_t* scales,
          const uint8_t* curv, const float* bias, float* out, const std::vector<Levels>& levels,
          int64_t m, int64_t n, int64_t ng, int64_t G, int64_t& bad, int64_t chunk) {
  const int64_t kp = ng * G, gb = G / 2;
  std::vector<float> coef(ng), w(ng);  // s / 1029 of the current row; times the activation scale
#pragma omp for schedule(dynamic, chunk)
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* cv = curv + row * ng;
    const uint16_t* sc = scales + row * ng;
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8)
      _mm256_storeu_ps(&coef[g], _mm256_mul_ps(
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))),
          _mm256_set1_ps(1.0f / 1029.0f)));
    for (; g < ng; ++g) coef[g] = _cvtsh_ss(sc[g]) * (1.0f / 1029.0f);
    uint8_t cmax = 0;
    for (g = 0; g < ng; ++g) cmax = std::max(cmax, cv[g]);
    if (cmax >= static_cast<int64_t>(levels.size())) {
      bad = 1;
      continue;
    }
    const uint8_t* crow = codes + row * ng * gb;
    for (int64_t r = 0; r < m; ++r) {
      const T* xr = &act.x[r * kp];
      const float* sx = &act.scale[r * ng];
      for (g = 0; g + 8 <= ng; g += 8)
        _mm256_storeu_ps(&w[g], _mm256_mul_ps(_mm256_loadu_ps(&coef[g]), _mm256_loadu_ps(sx + g)));
      for (; g < ng; ++g) w[g] = coef[g] * sx[g];
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (g = 0; g + 2 <= ng; g += 2) {
        const __m256 a = group_dot<CH>(crow + g * gb, xr + g * G, levels[cv[g]], G);
        const __m256 b = group_dot<CH>(crow + (g + 1) * gb, xr + (g + 1) * G, levels[cv[g + 1]], G);
        acc0 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(&w[g]), acc0);
        acc1 = _mm256_fmadd_ps(b, _mm256_broadcast_ss(&w[g + 1]), acc1);
      }
      if (g < ng) {
        acc0 = _mm256_fmadd_ps(group_dot<CH>(crow + g * gb, xr + g * G, levels[cv[g]], G),
                               _mm256_broadcast_ss(&w[g]), acc0);
      }
      out[r * n + row] = hsum(_mm256_add_ps(acc0, acc1)) + (bias ? bias[row] : 0.f);
    }
  }
}

template <class T>
int64_t run(const Activations<T>& act, const uint8_t* codes, const uint16_t* scales,
            const uint8_t* curv, const float* bias, float* out, const std::vector<Levels>& levels,
            int64_t m, int64_t n, int64_t ng, int64_t G) {
  int64_t bad = 0;
  // Dynamic chunks of ~1/8 of a thread's share: on a shared machine one core often runs slower
  // than the other, and a static split then waits for it (measured ~15% on the lm_head).
  const int64_t chunk = std::max<int64_t>(16, n / (8 * omp_get_max_threads()));
#pragma omp parallel reduction(| : bad)
  {
    const auto body = G == 64 ? rows<1, T> : G == 128 ? rows<2, T> : rows<0, T>;
    body(act, codes, scales, curv, bias, out, levels, m, n, ng, G, bad, chunk);
  }
  return bad;
}

}  // namespace

// Returns 1 (and leaves out incomplete) when a group's curvature index c has c * curv_step > 61,
// whose levels do not fit int16; 0 otherwise. act_bits: 8 rounds the activations, 0 keeps them.
extern "C" int64_t kernel(const float* x, const uint8_t* codes, const uint16_t* scales,
                          const uint8_t* curv, const float* bias, float* out, int64_t m, int64_t n,
                          int64_t ng, int64_t G, int64_t k, int64_t curv_step, int64_t has_bias,
                          int64_t act_bits) {
  if (curv_step < 0 || curv_step > 61) return 1;
  const std::vector<Levels>& levels = levels_for(curv_step);
  const float* b = has_bias ? bias : nullptr;
  if (act_bits == 8)
    return run(per_group<int16_t>(x, m, k, ng, G, quantize_group), codes, scales, curv, b, out,
               levels, m, n, ng, G);
  return run(per_group<float>(x, m, k, ng, G, permute_group), codes, scales, curv, b, out, levels,
             m, n, ng, G);
}
