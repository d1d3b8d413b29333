// W4A8 GEMV for rs::poincare_linear with act_bits=8: 4-bit codes, group_size % 64 == 0, integer
// curv_step (AVX2).
//
// The format decodes code q of a group with scale s and curvature index c to
//   w = s u (1 + c' u^2 / 3),  u = d / 7,  d = q - 7,  c' = c * curv_step
//     = s / 1029 * (147 d + c' d^3)
// and for an integer c' the level N(q) = 147 d + c' d^3 is an integer (|N| <= 32767 for
// c' <= 61). With int8 activations x8 = round(x / sx) (rs_compile.codec.activations),
//   y[r, n] = sum_g sx[r,g] * s[n,g] / 1029 * sum_k x8[r,k] N_g(q[n,k]) + bias[n]
// where the inner sum is exact in int32; the result differs from x8 * sx @ decode(W).T in float
// only in the rounding of float operations.
//
// Per 32 bytes of codes (64 weights; low nibbles are codes 0..31 of the chunk, high nibbles
// 32..63, the planar layout): two vpshufb per half look up the low and high byte of N from the
// group's 16-entry tables, vpunpck{l,h}bw interleave them into int16, and vpmaddwd multiplies with
// int16 activations stored in the order the interleave produces. About 20 instructions per 64
// weights, against about 80 for the float decode Inductor generates.
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

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  float v = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
          : exp == 31 ? (man ? NAN : INFINITY)
                      : std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
#endif
}

struct Activations {
  std::vector<int16_t> x16;  // [m, kp]; per 32 values the order 0..7, 16..23, 8..15, 24..31
  std::vector<float> scale;  // [m, ng]; NaN if the group holds a NaN or inf
};

Activations quantize(const float* x, int64_t m, int64_t k, int64_t ng, int64_t G) {
  const int64_t kp = ng * G;
  Activations a{std::vector<int16_t>(m * kp), std::vector<float>(m * ng)};
  std::vector<int16_t> q(G);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t lo = g * G, hi = std::min(k, lo + G);
      float amax = 0.f;
      bool finite = true;
      for (int64_t i = lo; i < hi; ++i) {
        const float v = x[r * k + i];
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      const float s = amax > 0.f ? amax / 127.0f : 1.0f;
      for (int64_t i = 0; i < G; ++i) {
        const float v = lo + i < hi && finite ? std::nearbyint(x[r * k + lo + i] / s) : 0.f;
        q[i] = static_cast<int16_t>(std::min(127.f, std::max(-127.f, v)));
      }
      a.scale[r * ng + g] = finite ? s : NAN;
      for (int64_t c = 0; c < G; c += 32) {
        int16_t* dst = &a.x16[r * kp + lo + c];
        for (int i = 0; i < 8; ++i) {
          dst[i] = q[c + i];
          dst[8 + i] = q[c + 16 + i];
          dst[16 + i] = q[c + 8 + i];
          dst[24 + i] = q[c + 24 + i];
        }
      }
    }
  }
  return a;
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline float hsum(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_hadd_ps(t, t);
  return _mm_cvtss_f32(_mm_hadd_ps(t, t));
}

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

}  // namespace

// status[0] is set to 1 (and out left incomplete) when a group's curvature index c has
// c * curv_step > 61, whose levels do not fit int16.
extern "C" void kernel(const float* x, const uint8_t* codes, const uint16_t* scales,
                       const uint8_t* curv, const float* bias, float* out, int64_t* status,
                       int64_t m, int64_t n, int64_t ng, int64_t G, int64_t k, int64_t curv_step,
                       int64_t has_bias) {
  const int64_t kp = ng * G, gb = G / 2;
  const int64_t ntables = curv_step == 0 ? 256 : std::min<int64_t>(256, 61 / curv_step + 1);
  std::vector<Levels> levels;
  for (int64_t c = 0; c < ntables; ++c) levels.emplace_back(c * curv_step);
  const Activations act = quantize(x, m, k, ng, G);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  int64_t bad = 0;
  // Dynamic chunks of ~1/8 of a thread's share: on a shared machine one core often runs slower
  // than the other, and a static split then waits for it (measured ~15% on the lm_head).
  const int64_t chunk = std::max<int64_t>(16, n / (8 * omp_get_max_threads()));
#pragma omp parallel reduction(| : bad)
  {
    std::vector<float> coef(ng);  // s / 1029 of the current row
#pragma omp for schedule(dynamic, chunk)
    for (int64_t row = 0; row < n; ++row) {
      for (int64_t g = 0; g < ng; ++g) {
        coef[g] = half_to_float(scales[row * ng + g]) * (1.0f / 1029.0f);
        bad |= curv[row * ng + g] >= ntables;
      }
      if (bad) continue;
      const uint8_t* crow = codes + row * ng * gb;
      for (int64_t r = 0; r < m; ++r) {
        const int16_t* x16 = &act.x16[r * kp];
        const float* sx = &act.scale[r * ng];
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; ++g) {
          const Levels& t = levels[curv[row * ng + g]];
          __m256i s = _mm256_setzero_si256();
          for (int64_t j = 0; j < gb; j += 32) {
            const __m256i v = load(crow + g * gb + j);
            const __m256i lo = _mm256_and_si256(v, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            const int16_t* xl = x16 + g * G + j;
            const int16_t* xh = xl + gb;
            __m256i l8 = _mm256_shuffle_epi8(t.low, lo), h8 = _mm256_shuffle_epi8(t.high, lo);
            __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(l8, h8), load(xl)),
                                         _mm256_madd_epi16(_mm256_unpackhi_epi8(l8, h8), load(xl + 16)));
            l8 = _mm256_shuffle_epi8(t.low, hi);
            h8 = _mm256_shuffle_epi8(t.high, hi);
            p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_unpacklo_epi8(l8, h8), load(xh)));
            p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_unpackhi_epi8(l8, h8), load(xh + 16)));
            s = _mm256_add_epi32(s, p);
          }
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(sx[g] * coef[g]), acc);
        }
        out[r * n + row] = hsum(acc) + (has_bias ? bias[row] : 0.f);
      }
    }
  }
  status[0] = bad;
}
