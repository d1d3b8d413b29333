// CPU kernel of rs::linear for the v2 format (rs_compile/codec/format.py):
//   y[m, n] = row_scale[n] * sum_g k[n, g] * sum_{j in g} x[m, j] * LEVELS[c[n, g]][q[n, j]] + bias[n]
// and the decode of whole rows (w = row_scale * k * level, float32) for the decode-then-GEMM path.
//
// Built once per machine by Inductor's C++ toolchain (rs_compile/lowering/cpu_kernel.py) with its
// flags; the vector paths carry their own target attributes and are chosen at run time from
// __builtin_cpu_supports, so one build serves the machine it was built on whatever Inductor's
// ISA flags are:
//   * AVX-512 F (+BW, VL, DQ for the helpers), 4-, 5- and 8-bit codes, group_size % 32 == 0:
//     levels looked up from per-group float tables held in registers (vpermps / vpermt2ps over the
//     k-scaled table), FMA with float activations; int8 activations (act_bits=8) with
//     AVX512-VNNI + VBMI: levels looked up as bytes (vpermb / vpermt2b over all four curvature
//     tables at once), vpdpbusd against the int8 activations, exact int32 sums per 64 code bytes.
//     Float activations (act_bits=0) with 4- and 5-bit codes take the same integer path on such
//     CPUs (fewer instructions per weight than the float lookups; measured in docs/benchmarks.md,
//     kernel section): each group of x is split into three int8 digits,
//     x = s (d0 + d1/254 + d2/254^2) with s = max|x|/127 (digits_group), one vpdpbusd pass per
//     digit. Each entry then carries at most ~2^-24 max|x| of its group of absolute error (what
//     float32 makes of the group's largest entry), on top of the float32 summation error; a NaN
//     or inf in x sends the call to the float path, which propagates it.
//   * everything else (2/3 bits, other group sizes, CPUs without AVX-512): plain C++, one group
//     decoded into a float buffer then multiplied (the compiler vectorises what it can).
// Every level times its step, k * LEVELS, is an integer below 2**14 (exact in float32), so all
// paths decode bit-identically and differ from decode + F.linear only in the order of float sums
// (and, for the digit path above, by the digits' bound).
//
// Accumulation bounds (int8 path): one int32 lane sums 4 bytes from each of the two 64-byte code
// vectors of a chunk: 8 products |(level + 128) * x8| <= 255 * 127, i.e. below 2**18, then the
// lane is converted to float; nothing accumulates in int32 across chunks, so no group_size limit
// comes from overflow. The float paths accumulate in float32.
//
// The format's constants are not restated here: cpu_kernel.py prepends them as #defines read
// from rs_compile/codec/format.py (RS_CURVATURE_BITS, RS_TABLES, RS_UNIFORM_BITS,
// RS_FORMAT_PLANES, RS_ACT_TOP for the activation rounding, RS_MAX_GROUP_SIZE for the buffers).
// The generic path follows any of them; the vector paths are written for 2-bit table indices
// over 4 tables and the uniform table q - 128 (checked at run time), and are skipped otherwise.
//
// Entry: kernel(...) returns 0 on success, a negative status for arguments it refuses (checked
// before anything is read); the Python side checks shapes first, this is the second line.
#ifndef RS_CURVATURE_BITS
#error "build this file through rs_compile/lowering/cpu_kernel.py, which defines the format's constants"
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kMaxRows = 8;  // rows of x per pass over the weight (callers split larger M)

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Layer {
  const uint8_t* codes;
  const uint8_t* groups;
  const uint16_t* row_scale;
  const float* bias;  // may be null
  int64_t N, K, G, ng, bits;
  int64_t row_bytes;  // ng * G * bits / 8
  const float* levels;  // [tables][2**bits] as float
  int ntables;
};

// ---------------------------------------------------------------- generic (any width / group)

const int* planes_of(int64_t bits, int* count) {
#define RS_PLANES_CASE(B, ...)                                   \
  case B: {                                                      \
    static const int p[] = {__VA_ARGS__};                        \
    *count = static_cast<int>(sizeof(p) / sizeof(p[0]));         \
    return p;                                                    \
  }
  switch (bits) { RS_FORMAT_PLANES(RS_PLANES_CASE) }
#undef RS_PLANES_CASE
  *count = 0;
  return nullptr;
}

// w[0..G) = k * LEVELS[c][q] for group g of row n (without the row scale)
void decode_group_generic(const Layer& L, int64_t n, int64_t g, float* w) {
  const uint8_t* p = L.codes + n * L.row_bytes + g * (L.G * L.bits / 8);
  const int8_t gb = static_cast<int8_t>(L.groups[n * L.ng + g]);
  const int cb = L.bits == RS_UNIFORM_BITS ? 0 : RS_CURVATURE_BITS;
  const int k = gb >> cb;  // arithmetic shift of the signed byte
  const int c = gb & ((1 << cb) - 1);
  const float* lv = L.levels + (static_cast<int64_t>(c) << L.bits);
  int np;
  const int* planes = planes_of(L.bits, &np);
  int q[RS_MAX_GROUP_SIZE];  // checked by the entry
  for (int64_t j = 0; j < L.G; ++j) q[j] = 0;
  int low = 0;
  for (int pi = 0; pi < np; ++pi) {
    const int w_ = planes[pi];
    const int64_t nbytes = L.G * w_ / 8;
    const int mask = (1 << w_) - 1;
    for (int t = 0; t < 8 / w_; ++t)  // code t * nbytes + b sits in byte b at bit w * t
      for (int64_t b = 0; b < nbytes; ++b) q[t * nbytes + b] |= ((p[b] >> (w_ * t)) & mask) << low;
    p += nbytes;
    low += w_;
  }
  const float kf = static_cast<float>(k);
  for (int64_t j = 0; j < L.G; ++j) w[j] = kf * lv[q[j]];
}

void gemv_rows_generic(const Layer& L, const float* xp, int64_t M, int64_t Kp, float* y,
                       int64_t n0, int64_t n1) {
  float w[RS_MAX_GROUP_SIZE];
  for (int64_t n = n0; n < n1; ++n) {
    float acc[kMaxRows] = {0};
    for (int64_t g = 0; g < L.ng; ++g) {
      decode_group_generic(L, n, g, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * Kp + g * L.G;
        float s[8] = {0};  // G % 8 == 0; eight partial sums let the compiler vectorise
        for (int64_t j = 0; j < L.G; j += 8)
          for (int i = 0; i < 8; ++i) s[i] += xr[j + i] * w[j + i];
        acc[m] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      }
    }
    const float rs = bf16_to_float(L.row_scale[n]);
    const float b = L.bias ? L.bias[n] : 0.0f;
    for (int64_t m = 0; m < M; ++m) y[m * L.N + n] = rs * acc[m] + b;
  }
}

void decode_rows_generic(const Layer& L, float* out, int64_t n0, int64_t n1) {
  float w[RS_MAX_GROUP_SIZE];
  for (int64_t n = n0; n < n1; ++n) {
    const float rs = bf16_to_float(L.row_scale[n]);
    float* o = out + n * L.K;
    for (int64_t g = 0; g < L.ng; ++g) {
      decode_group_generic(L, n, g, w);
      const int64_t len = std::min(L.G, L.K - g * L.G);
      for (int64_t j = 0; j < len; ++j) o[g * L.G + j] = rs * w[j];
    }
  }
}

// ---------------------------------------------------------------- AVX-512 float paths
#define RS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define RS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,fma")))

// A decoder yields, for sub-block s of a group (s < G / 32), the weights k * level of codes
// 16s .. 16s+15 (lo) and G/2 + 16s .. G/2 + 16s + 15 (hi) as 16 floats each.
struct Dec4 {
  __m512 t;
  const uint8_t* p;
  RS_AVX512 inline void group(const Layer& L, const uint8_t* gp, uint8_t gbyte) {
    const int8_t gb = static_cast<int8_t>(gbyte);
    t = _mm512_mul_ps(_mm512_loadu_ps(L.levels + ((gb & 3) << 4)), _mm512_set1_ps(float(gb >> 2)));
    p = gp;
  }
  RS_AVX512 inline void get(const Layer&, int64_t s, __m512& lo, __m512& hi) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * s)));
    lo = _mm512_permutexvar_ps(b, t);  // vpermps reads the low 4 bits of each index
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
  }
};

// 5 bits: plane of 4 (G/2 bytes, like Dec4) then a plane of 1 (G/8 bytes): code j's fifth bit
// is bit j / (G/8) of byte j % (G/8). Per lane, a dword permute brings that byte's dword and a
// rotate puts the bit at position 4; vpternlogd merges it above the nibble, vpermt2ps looks the
// 5-bit index up in the 32-entry table. The permute/rotate vectors depend on G only (Aux5).
struct Aux5 {
  // for s < G/32: [2s] lo, [2s + 1] hi
  alignas(64) int32_t idx[32][16];
  alignas(64) int32_t rot[32][16];
  void init(int64_t G) {
    const int64_t B1 = G / 8;
    for (int64_t s = 0; s < G / 32; ++s)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 16; ++i) {
          const int64_t j = (h ? G / 2 : 0) + 16 * s + i;
          const int64_t byte = j % B1, bit = j / B1;
          idx[2 * s + h][i] = static_cast<int32_t>(byte / 4);
          rot[2 * s + h][i] = static_cast<int32_t>(((8 * (byte % 4) + bit - 4) % 32 + 32) % 32);
        }
  }
};

struct Dec5 {
  __m512 t0, t1;
  __m512i p1;
  const uint8_t* p;
  const Aux5* aux;
  RS_AVX512 inline void group(const Layer& L, const uint8_t* gp, uint8_t gbyte) {
    const int8_t gb = static_cast<int8_t>(gbyte);
    const __m512 kf = _mm512_set1_ps(float(gb >> 2));
    const float* lv = L.levels + ((gb & 3) << 5);
    t0 = _mm512_mul_ps(_mm512_loadu_ps(lv), kf);
    t1 = _mm512_mul_ps(_mm512_loadu_ps(lv + 16), kf);
    p = gp;
    const int64_t dw = L.G / 32;  // dwords of the 1-bit plane (G <= 512 here)
    if (dw == 1) {  // groups of 32: every lane reads the one dword
      int32_t d;
      std::memcpy(&d, gp + 16, 4);
      p1 = _mm512_set1_epi32(d);
    } else {
      p1 = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << dw) - 1), gp + L.G / 2);
    }
    one_dword = dw == 1;
  }
  bool one_dword = false;
  RS_AVX512 inline __m512 one(const __m512i nib, int r) const {
    const __m512i src = one_dword ? p1 : _mm512_permutexvar_epi32(_mm512_load_si512(aux->idx[r]), p1);
    const __m512i bit = _mm512_rorv_epi32(src, _mm512_load_si512(aux->rot[r]));
    // bits 0-3 from the nibble, bits 4.. from the rotated plane (vpermt2ps reads bits 0-4)
    const __m512i ix = _mm512_ternarylogic_epi32(nib, bit, _mm512_set1_epi32(0x0F), 0xE4);
    return _mm512_permutex2var_ps(t0, ix, t1);
  }
  RS_AVX512 inline void get(const Layer&, int64_t s, __m512& lo, __m512& hi) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * s)));
    lo = one(b, 2 * s);
    hi = one(_mm512_srli_epi32(b, 4), 2 * s + 1);
  }
};

// 8 bits, one table LEVELS[q] = q - 128 (checked by the caller): w = k q - 128 k, exact.
struct Dec8 {
  __m512 kf, off;
  const uint8_t* p;
  int64_t half;
  RS_AVX512 inline void group(const Layer& L, const uint8_t* gp, uint8_t gbyte) {
    const float k = float(static_cast<int8_t>(gbyte));
    kf = _mm512_set1_ps(k);
    off = _mm512_set1_ps(-128.0f * k);
    p = gp;
    half = L.G / 2;
  }
  RS_AVX512 inline __m512 one(const uint8_t* q) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), kf, off);
  }
  RS_AVX512 inline void get(const Layer&, int64_t s, __m512& lo, __m512& hi) const {
    lo = one(p + 16 * s);
    hi = one(p + half + 16 * s);
  }
};

// A decode step streams every weight byte once from memory, and the hardware prefetchers alone
// reached ~8 GB/s of the machine's ~28 (Gemma-3-270M's layers out of cache, 2 threads). Each row
// therefore asks for the row at least RS_PREFETCH_BYTES ahead (benchmarks/decode_step_kernels.py,
// 2 threads, 512 / 1024 / 2048 / 4096 tried:
// 1024 best, 13.0 -> 6.1 ms for the 262144 x 640 5-bit head); lines past the chunk's end are
// harmless reads.
#ifndef RS_PREFETCH_BYTES
#define RS_PREFETCH_BYTES 1024
#endif
inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes) {
  const int64_t ahead = ((RS_PREFETCH_BYTES + row_bytes - 1) / row_bytes) * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row + ahead + b), _MM_HINT_T0);
}

template <class Dec, int MB>
RS_AVX512 void gemv_rows_avx512(const Layer& L, const Aux5* aux, const float* xp, int64_t Kp,
                                float* y, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t G = L.G, gbytes = G * L.bits / 8, S = G / 32;
  Dec dec;
  if constexpr (std::is_same_v<Dec, Dec5>) dec.aux = aux;
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead(L.codes + n * L.row_bytes, L.row_bytes);
    // four accumulators per row (lo / hi codes of even / odd groups): with one FMA per 16 codes,
    // two chains would wait on the FMA latency in groups of 32
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    const uint8_t* row = L.codes + n * L.row_bytes;
    const uint8_t* grow = L.groups + n * L.ng;
    auto one_group = [&](int64_t g, __m512 (&a)[MB][4], int o) RS_AVX512 {
      dec.group(L, row + g * gbytes, grow[g]);
      const float* xg = xp + m0 * Kp + g * G;
      for (int64_t s = 0; s < S; ++s) {
        __m512 lo, hi;
        dec.get(L, s, lo, hi);
        for (int m = 0; m < MB; ++m) {
          a[m][o] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xg + m * Kp + 16 * s), a[m][o]);
          a[m][o + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + m * Kp + G / 2 + 16 * s), a[m][o + 1]);
        }
      }
    };
    int64_t g = 0;
    for (; g + 1 < L.ng; g += 2) {
      one_group(g, acc, 0);
      one_group(g + 1, acc, 2);
    }
    if (g < L.ng) one_group(g, acc, 0);
    const float rs = bf16_to_float(L.row_scale[n]);
    const float b = L.bias ? L.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * L.N + n] = rs * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                                      _mm512_add_ps(acc[m][2], acc[m][3]))) + b;
  }
}

template <class Dec>
RS_AVX512 void decode_rows_avx512(const Layer& L, const Aux5* aux, float* out, int64_t n0, int64_t n1) {
  const int64_t G = L.G, gbytes = G * L.bits / 8, S = G / 32;
  Dec dec;
  if constexpr (std::is_same_v<Dec, Dec5>) dec.aux = aux;
  alignas(64) float tail[RS_MAX_GROUP_SIZE];  // the last group when K is not a multiple of G
  for (int64_t n = n0; n < n1; ++n) {
    const __m512 rs = _mm512_set1_ps(bf16_to_float(L.row_scale[n]));
    const uint8_t* row = L.codes + n * L.row_bytes;
    float* o = out + n * L.K;
    for (int64_t g = 0; g < L.ng; ++g) {
      dec.group(L, row + g * gbytes, L.groups[n * L.ng + g]);
      const bool full = (g + 1) * G <= L.K;
      float* dst = full ? o + g * G : tail;
      for (int64_t s = 0; s < S; ++s) {
        __m512 lo, hi;
        dec.get(L, s, lo, hi);
        _mm512_storeu_ps(dst + 16 * s, _mm512_mul_ps(lo, rs));
        _mm512_storeu_ps(dst + G / 2 + 16 * s, _mm512_mul_ps(hi, rs));
      }
      if (!full) std::memcpy(o + g * G, tail, (L.K - g * G) * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------- AVX512-VNNI int8 path
// act_bits=8, 4- and 8-bit codes with group_size a power of two >= 32, 5-bit codes in groups of
// 32, 64 or 128 (Aux5v). A "unit" is 64 bytes of a
// row's codes. 4 bits: its four 16-byte sub-blocks carry 16 low-nibble codes and 16 high-nibble
// codes each (codes 16s.. and G/2 + 16s.. of their group); the level of every code is looked up
// as the byte L + 128 (vpermb over a 64-byte table holding all four curvature tables, index
// nibble | c << 4), and vpdpbusd multiplies those unsigned bytes with the int8 activations, laid
// out per call in the same order (XPrep). 8 bits: the code byte q is already L + 128 (the table
// is q - 128, checked), no lookup. Int32 lane i of a unit sums 8 (4 bits) or 4 (8 bits) products
// below 255 * 127 in magnitude: far from overflow (see the file header). Per lane, in float:
//   t = sx * dot - 128 * sx * S_g / lanes_per_group   (S_g = sum of the group's x8: the +128 bias)
//   acc += k * t
// and y = row_scale * sum(acc) + bias. sx, S_g and the lane maps depend on x and G only.

struct XPrep {
  int64_t U = 0;                    // units per row
  int D = 1;                        // int8 digits per activation (1: act_bits=8; kDigits: float)
  std::vector<int8_t> xa, xb;       // [M][U][D][64]: activations matching the lo / hi code bytes
  std::vector<float> f, c;          // [M][U][16]: sx and the bias correction per lane
  std::vector<uint8_t> nanrow;      // [M]: a NaN or inf in the row (result row NaN)
};

// x8 rounding of one group (activations.py) into q[0..len); *S = sum of q. Returns false for a
// NaN or inf in the group.
bool round_group(const float* x, int64_t len, int8_t* q, int64_t, float* sx, double* S) {
  float amax = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const float a = std::fabs(x[j]);
    if (!(a <= 3.4028235e38f)) return false;
    amax = std::max(amax, a);
  }
  const float s = amax > 0.0f ? amax / RS_ACT_TOP : 1.0f;
  int32_t sum = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float r = std::nearbyint(x[j] / s);
    const int v = static_cast<int>(std::min(RS_ACT_TOP, std::max(-RS_ACT_TOP, r)));
    q[j] = static_cast<int8_t>(v);
    sum += v;
  }
  *sx = s;
  *S = sum;
  return true;
}

// Float activations as kDigits int8 digits per group: x = s (d0 + d1 / R + d2 / R^2), R = 254,
// s = max|x| / 127, each digit the rounded remainder of the previous ones (|d| <= 127), so that
// |x - s (d0 + d1 / R + d2 / R^2)| <= s / (2 R^2) + float rounding, below 1.2e-7 max|x| of the
// group: below float32's own rounding of the products for all but the group's tiny entries.
// Digit i of code j goes to q[i * stride + j]; *S = the sum of every x / s so represented.
constexpr int kDigits = 3;
constexpr double kRadix = 254.0;
// Eight entries at a time in double (the same operations as one entry at a time, so the same
// digits; only S is summed in another order): the scalar loop took ~5 us per 640 entries, a
// sixth of a small layer's call.
RS_AVX512 bool digits_group(const float* x, int64_t len, int8_t* q, int64_t stride, float* sx,
                            double* S) {
  auto lanes = [len](int64_t j) {
    return len - j >= 8 ? __mmask8(0xFF) : static_cast<__mmask8>((1u << (len - j)) - 1);
  };
  const __m512d fmax = _mm512_set1_pd(3.4028235e38);
  __m512d amax = _mm512_setzero_pd();
  for (int64_t j = 0; j < len; j += 8) {
    const __m512d a = _mm512_abs_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(lanes(j), x + j)));
    if (_mm512_cmp_pd_mask(a, fmax, _CMP_LE_OQ) != 0xFF) return false;  // NaN or inf
    amax = _mm512_max_pd(amax, a);
  }
  const double m = _mm512_reduce_max_pd(amax);
  const __m512d s = _mm512_set1_pd(m > 0.0 ? m / 127.0 : 1.0);
  const __m512d top = _mm512_set1_pd(127.0), bottom = _mm512_set1_pd(-127.0);
  const __m512d radix = _mm512_set1_pd(kRadix);
  __m512d sum = _mm512_setzero_pd();
  for (int64_t j = 0; j < len; j += 8) {
    const __mmask8 k = lanes(j);
    __m512d r = _mm512_div_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, x + j)), s);
    __m512d v = _mm512_setzero_pd();
    double w = 1.0;
    for (int i = 0; i < kDigits; ++i) {
      const __m512d d = _mm512_min_pd(top, _mm512_max_pd(bottom, _mm512_roundscale_pd(
          r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      _mm_mask_storeu_epi8(q + i * stride + j, k, _mm256_cvtepi32_epi8(_mm512_cvtpd_epi32(d)));
      v = _mm512_add_pd(v, _mm512_mul_pd(d, _mm512_set1_pd(w)));
      r = _mm512_mul_pd(_mm512_sub_pd(r, d), radix);
      w /= kRadix;
    }
    sum = _mm512_add_pd(sum, v);  // masked-off lanes hold x = 0: all-zero digits
  }
  *sx = static_cast<float>(_mm512_cvtsd_f64(s));
  *S = _mm512_reduce_add_pd(sum);
  return true;
}

template <class Round>
void prep_x(const float* x, int64_t M, int64_t K, int64_t G, int64_t ng, int64_t bits, int D,
            Round round, XPrep& P) {
  const int64_t unit_bytes = bits == 8 ? ng * G : ng * G / 2;  // code bytes (4/5 bits: nibbles)
  P.U = (unit_bytes + 63) / 64;
  P.D = D;
  const int64_t U = P.U, Kp = ng * G;
  P.xa.assign(M * U * D * 64, 0);
  P.xb.assign(bits != 8 ? M * U * D * 64 : 0, 0);
  P.f.assign(M * U * 16, 0.0f);
  P.c.assign(M * U * 16, 0.0f);
  P.nanrow.assign(M, 0);
  std::vector<int8_t> q(D * Kp);  // [D][Kp]
  std::vector<float> sx(ng);
  std::vector<double> S(ng);
  const int64_t lanes_per_group = bits != 8 ? G / 8 : G / 4;
  for (int64_t m = 0; m < M; ++m) {
    std::fill(q.begin(), q.end(), int8_t{0});
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t len = std::min(G, K - g * G);
      if (!round(x + m * K + g * G, len, q.data() + g * G, Kp, &sx[g], &S[g])) P.nanrow[m] = 1;
    }
    float* f = P.f.data() + m * U * 16;
    float* c = P.c.data() + m * U * 16;
    auto lane = [&](int64_t l, int64_t g) {
      f[l] = sx[g];
      c[l] = static_cast<float>(128.0 * sx[g] * S[g] / static_cast<double>(lanes_per_group));
    };
    for (int d = 0; d < D; ++d) {
      const int8_t* qd = q.data() + d * Kp;
      int8_t* xa = P.xa.data() + m * U * D * 64 + d * 64;  // unit u's block: + u * D * 64
      if (bits != 8) {
        int8_t* xb = P.xb.data() + m * U * D * 64 + d * 64;
        const int64_t per_group = G / 32;  // 16-byte sub-blocks per group
        for (int64_t gs = 0; gs < ng * per_group; ++gs) {
          const int64_t g = gs / per_group, sblk = gs % per_group, u = gs / 4, o = u * D * 64 + 16 * (gs % 4);
          std::memcpy(xa + o, qd + g * G + 16 * sblk, 16);
          std::memcpy(xb + o, qd + g * G + G / 2 + 16 * sblk, 16);
          if (d == 0)
            for (int i = 0; i < 4; ++i) lane(4 * gs + i, g);  // lanes 4 gs .. 4 gs + 3
        }
      } else {
        for (int64_t u = 0; u < U; ++u)
          std::memcpy(xa + u * D * 64, qd + 64 * u, std::min<int64_t>(64, Kp - 64 * u));
        if (d == 0)
          for (int64_t l = 0; l < ng * G / 4; ++l) lane(l, 4 * l / G);
      }
    }
  }
}

// 5 bits (groups of 32, 64 or 128): a unit is 80 raw bytes, the nibble planes and 1-bit planes of
// 128 codes (4, 2 or 1 groups). One vpermt2b gathers the 64 nibble bytes; another gathers, per
// qword, the 1-bit-plane bytes that qword's codes need (a group's 4 bytes twice for groups of 32)
// and vpmultishiftqb moves each code's bit to bit 4 of its byte; the index nibble | bit << 4 |
// c << 5 then looks the level up in a 128-byte table (vpermt2b over two registers).
struct Aux5v {
  alignas(64) uint8_t nidx[64], pidx[64], ctrl_lo[64], ctrl_hi[64];
  void init(int64_t G) {
    const int64_t half = G / 2, B1 = G / 8, gbytes = 5 * G / 8;
    for (int b = 0; b < 64; ++b) {
      nidx[b] = static_cast<uint8_t>((b / half) * gbytes + b % half);
      const int q = b / 8, i = b % 8;
      const int64_t P = 8 * q, gi = P / half, p0 = P % half, p = p0 + i;
      const int64_t w0 = B1 >= 8 ? p0 % B1 : 0;
      pidx[b] = static_cast<uint8_t>(gi * gbytes + half + (B1 >= 8 ? w0 + i : i % 4));
      const int64_t off = 8 * (p % B1 - w0) + p / B1;
      ctrl_lo[b] = static_cast<uint8_t>(((off - 4) % 64 + 64) % 64);
      ctrl_hi[b] = static_cast<uint8_t>(off % 64);
    }
  }
};

template <int BITS, int MB, int D>
RS_VNNI void gemv_rows_vnni(const Layer& L, const XPrep& P, const int8_t* levels, float* y,
                            int64_t n0, int64_t n1, int64_t m0) {
  const int64_t G = L.G, U = P.U, row_bytes = L.row_bytes;
  // lane / byte -> group offset within a unit (G a power of two >= 32)
  alignas(64) uint8_t rep64[64], rep16[16];
  const int64_t bytes_per_group = BITS == 8 ? G : G / 2;
  const int gshift = __builtin_ctzll(static_cast<unsigned long long>(bytes_per_group));  // G: a power of 2
  for (int b = 0; b < 64; ++b) rep64[b] = static_cast<uint8_t>(b / bytes_per_group);
  for (int i = 0; i < 16; ++i) rep16[i] = static_cast<uint8_t>(4 * i / bytes_per_group);
  const __m512i vrep64 = _mm512_load_si512(rep64);
  const __m128i vrep16 = _mm_load_si128(reinterpret_cast<const __m128i*>(rep16));
  alignas(64) uint8_t tab[128];
  if (BITS == 4)
    for (int i = 0; i < 64; ++i) tab[i] = static_cast<uint8_t>(levels[i] + 128);
  if (BITS == 5)
    for (int i = 0; i < 128; ++i) tab[i] = static_cast<uint8_t>(levels[i] + 128);
  const __m512i vtab = _mm512_load_si512(tab), vtab1 = _mm512_load_si512(tab + 64);
  const __m512i lowmask = _mm512_set1_epi8(0x0F), mask5 = _mm512_set1_epi8(0x1F);
  Aux5v a5;
  if (BITS == 5) a5.init(G);
  const __m512i nidx = _mm512_load_si512(a5.nidx), pidx = _mm512_load_si512(a5.pidx);
  const __m512i ctrl_lo = _mm512_load_si512(a5.ctrl_lo), ctrl_hi = _mm512_load_si512(a5.ctrl_hi);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.codes + n * row_bytes;
    const uint8_t* grow = L.groups + n * L.ng;
    prefetch_ahead(row, row_bytes);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < U; ++u) {
      __m512i v, pd;
      if (BITS == 5) {
        const uint8_t* r = row + 80 * u;
        const int64_t rem = row_bytes - 80 * u;
        __m512i r0, r1;
        if (rem >= 80) {
          r0 = _mm512_loadu_si512(r);
          r1 = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 64)));
        } else {
          r0 = _mm512_maskz_loadu_epi8(rem >= 64 ? ~__mmask64(0) : (__mmask64(1) << rem) - 1, r);
          r1 = _mm512_maskz_loadu_epi8(rem > 64 ? (__mmask64(1) << (rem - 64)) - 1 : 0, r + 64);
        }
        v = _mm512_permutex2var_epi8(r0, nidx, r1);
        pd = _mm512_permutex2var_epi8(r0, pidx, r1);
      } else {
        const int64_t rem = row_bytes - 64 * u;
        v = rem >= 64 ? _mm512_loadu_si512(row + 64 * u)
                      : _mm512_maskz_loadu_epi8((__mmask64(1) << rem) - 1, row + 64 * u);
        pd = v;
      }
      const int64_t gbase = (64 * u) >> gshift;  // a shift: an idiv per unit cost 10-25%
      const int64_t grem = L.ng - gbase;
      const __m128i gb = _mm_maskz_loadu_epi8(grem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << grem) - 1),
                                              grow + gbase);
      __m512i k32 = _mm512_cvtepi8_epi32(_mm_permutexvar_epi8(vrep16, gb));
      if (BITS != 8) k32 = _mm512_srai_epi32(k32, 2);
      const __m512 kf = _mm512_cvtepi32_ps(k32);
      __m512i wa, wb;
      if (BITS == 4) {
        const __m512i csh = _mm512_slli_epi16(_mm512_permutexvar_epi8(vrep64, _mm512_castsi128_si512(gb)), 4);
        // bits 0-3 from the nibble, 4-5 from c (vpermb reads 6 bits)
        wa = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(v, csh, lowmask, 0xE4), vtab);
        wb = _mm512_permutexvar_epi8(
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), csh, lowmask, 0xE4), vtab);
      } else if (BITS == 5) {
        const __m512i crep = _mm512_permutexvar_epi8(vrep64, _mm512_castsi128_si512(gb));
        const __m512i csh = _mm512_slli_epi16(crep, 5);  // c at bits 5-6
        const __m512i blo = _mm512_multishift_epi64_epi8(ctrl_lo, pd);  // the fifth bit at bit 4
        const __m512i bhi = _mm512_multishift_epi64_epi8(ctrl_hi, pd);
        const __m512i ilo = _mm512_ternarylogic_epi32(_mm512_ternarylogic_epi32(v, blo, lowmask, 0xE4),
                                                      csh, mask5, 0xE4);
        const __m512i ihi = _mm512_ternarylogic_epi32(
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), bhi, lowmask, 0xE4), csh, mask5, 0xE4);
        wa = _mm512_permutex2var_epi8(vtab, ilo, vtab1);
        wb = _mm512_permutex2var_epi8(vtab, ihi, vtab1);
      } else {
        wa = v;
        wb = v;
      }
      for (int m = 0; m < MB; ++m) {
        const int64_t o = (m0 + m) * U + u;
        __m512 dot[D];  // per digit; exact int32 sums converted exactly (below 2**18)
        for (int i = 0; i < D; ++i) {
          const int64_t od = (o * D + i) * 64;
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, _mm512_loadu_si512(P.xa.data() + od));
          if (BITS != 8) d = _mm512_dpbusd_epi32(d, wb, _mm512_loadu_si512(P.xb.data() + od));
          dot[i] = _mm512_cvtepi32_ps(d);
        }
        __m512 v = dot[D - 1];  // Horner: dot0 + (dot1 + dot2 / R) / R
        for (int i = D - 2; i >= 0; --i)
          v = _mm512_fmadd_ps(v, _mm512_set1_ps(static_cast<float>(1.0 / kRadix)), dot[i]);
        const __m512 t = _mm512_fmsub_ps(v, _mm512_loadu_ps(P.f.data() + 16 * o),
                                         _mm512_loadu_ps(P.c.data() + 16 * o));
        acc[m] = _mm512_fmadd_ps(kf, t, acc[m]);
      }
    }
    const float rs = bf16_to_float(L.row_scale[n]);
    const float b = L.bias ? L.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * L.N + n] = P.nanrow[m0 + m] ? NAN : rs * _mm512_reduce_add_ps(acc[m]) + b;
  }
}

// ---------------------------------------------------------------- dispatch

bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return v;
}
bool has_vnni() {
  static const bool v = has_avx512() && __builtin_cpu_supports("avx512vnni") &&
                        __builtin_cpu_supports("avx512vbmi");
  return v;
}

int num_threads(int64_t requested) {
#ifdef _OPENMP
  return requested > 0 ? static_cast<int>(requested) : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Rounds row x[0..K) to int8 levels per group exactly as rs_compile/codec/activations.py does
// (s = max|x| / 127 or 1 for an all-zero group, round half to even of x / s, times s), writing
// the rounded floats to xq[0..Kp) (zeros past K).
void quantize_row(const float* x, int64_t K, int64_t G, int64_t Kp, float* xq) {
  for (int64_t g0 = 0; g0 < Kp; g0 += G) {
    const int64_t len = std::max<int64_t>(0, std::min(G, K - g0));
    float amax = 0.0f;
    bool nan = false;
    for (int64_t j = 0; j < len; ++j) {
      const float a = std::fabs(x[g0 + j]);
      if (a != a) nan = true;
      amax = std::max(amax, a);
    }
    // torch: s = where(amax > 0, amax / 127, 1); a NaN amax compares false, so s = 1
    const float s = (!nan && amax > 0.0f) ? amax / RS_ACT_TOP : 1.0f;
    for (int64_t j = 0; j < len; ++j) xq[g0 + j] = std::nearbyint(x[g0 + j] / s) * s;
    for (int64_t j = len; j < G; ++j) xq[g0 + j] = 0.0f;
  }
}

enum Path { kGeneric = 0, kAvx512 = 1, kVnni = 2, kVnniFloat = 3 };  // kVnniFloat: float x as int8 digits

int pick_path(const Layer& L, int64_t act_bits, int64_t flags) {
  if (flags & 1) return kGeneric;
  if (L.G % 32 != 0 || !has_avx512()) return kGeneric;
  if (RS_CURVATURE_BITS != 2 || RS_TABLES != 4) return kGeneric;  // the vector paths' layout
  const bool pow2 = (L.G & (L.G - 1)) == 0;
  if (!(flags & 2) && has_vnni() && pow2 &&
      (L.bits == 4 || L.bits == 8 || (L.bits == 5 && L.G <= 128))) {
    bool q128 = true;  // 8 bits: the one table must be q - 128 (then the code byte is L + 128)
    if (L.bits == 8)
      for (int q = 0; q < 256; ++q) q128 = q128 && L.levels[q] == float(q - 128);
    // float x as digits pays off where the float path looks levels up per 16 codes (4, 5 bits);
    // 8-bit codes need no lookup and measured the same either way: they keep exact floats
    if (q128 && act_bits == 8) return kVnni;
    if (act_bits == 0 && L.bits != 8) return kVnniFloat;
  }
  if (L.bits == 4) return kAvx512;
  if (L.bits == 5 && L.G <= 512) return kAvx512;
  if (L.bits == 8) {
    for (int q = 0; q < 256; ++q)
      if (L.levels[q] != float(q - 128)) return kGeneric;
    return kAvx512;
  }
  return kGeneric;
}

}  // namespace

// mode 0: y[M, N] = x[M, K] @ decode(W)^T (+ bias); mode 1: out[N, K] = decode(W) (x, M ignored);
// mode 2: return the feature bits (1 AVX-512, 2 VNNI+VBMI) without touching any pointer.
// flags bit 0: force the generic path (tests); bit 1: no VNNI path (act_bits=8 then rounds the
// activations to floats and runs the float path; act_bits=0 runs the float path on x as is).
int64_t kernel(const float* x, const uint8_t* codes, const uint8_t* groups, const uint16_t* row_scale,
               const float* bias, const int8_t* levels, float* out, int64_t M, int64_t N, int64_t K,
               int64_t bits, int64_t G, int64_t ng, int64_t act_bits, int64_t has_bias,
               int64_t nthreads, int64_t mode, int64_t flags) {
  if (mode == 2) return (has_avx512() ? 1 : 0) | (has_vnni() ? 2 : 0);
  int np;
  if (planes_of(bits, &np) == nullptr) return -1;
  if (G <= 0 || G % 8 != 0 || G > RS_MAX_GROUP_SIZE) return -2;
  if (K <= 0 || N < 0 || ng != (K + G - 1) / G) return -3;
  if (mode == 0 && (M < 0 || (act_bits != 0 && act_bits != 8))) return -4;
  if (N == 0 || (mode == 0 && M == 0)) return 0;

  const int ntables = bits == RS_UNIFORM_BITS ? 1 : RS_TABLES;
  std::vector<float> lv(static_cast<size_t>(ntables) << bits);
  for (size_t i = 0; i < lv.size(); ++i) lv[i] = static_cast<float>(levels[i]);
  Layer L{codes, groups, row_scale, has_bias ? bias : nullptr, N, K, G, ng, bits,
          ng * G * bits / 8, lv.data(), ntables};
  Aux5 aux;
  if (bits == 5) aux.init(G);
  // Small layers run on one thread: below ~256K weights a second thread saves less than the
  // fork / join costs on an idle machine, and on a busy one (a second thread waiting for a core)
  // it costs much more (256 x 640, 4-bit, one CPU-bound process beside: 26 us on two threads,
  // 20 us on one).
  const int64_t weights_per_thread = 1 << 18;
  const int nt = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(num_threads(nthreads), (N * K * std::max<int64_t>(M, 1)) / weights_per_thread + 1)));

  if (mode == 1) {
    const int path = pick_path(L, 0, flags | 2);
    const int64_t chunk = std::max<int64_t>(16, N / (8 * nt) + 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c0 = 0; c0 < N; c0 += chunk) {
      const int64_t c1 = std::min(N, c0 + chunk);
      if (path == kGeneric) decode_rows_generic(L, out, c0, c1);
      else if (bits == 4) decode_rows_avx512<Dec4>(L, &aux, out, c0, c1);
      else if (bits == 5) decode_rows_avx512<Dec5>(L, &aux, out, c0, c1);
      else decode_rows_avx512<Dec8>(L, &aux, out, c0, c1);
    }
    return 0;
  }
  if (mode != 0) return -5;

  int path = pick_path(L, act_bits, flags);
  if (path == kVnni || path == kVnniFloat) {
    XPrep P;
    if (path == kVnni) prep_x(x, M, K, G, ng, bits, 1, round_group, P);
    else prep_x(x, M, K, G, ng, bits, kDigits, digits_group, P);
    // float activations with a NaN or inf: the float path (it propagates them as F.linear does)
    const bool fallback = path == kVnniFloat &&
                          std::any_of(P.nanrow.begin(), P.nanrow.end(), [](uint8_t v) { return v != 0; });
    if (!fallback) {
      const int64_t chunk = std::max<int64_t>(8, N / (16 * nt) + 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
      for (int64_t c0 = 0; c0 < N; c0 += chunk) {
        const int64_t c1 = std::min(N, c0 + chunk);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const int64_t mb = std::min<int64_t>(4, M - m0);
#define RS_CALL(B, D)                                                                  \
  switch (mb) {                                                                       \
    case 1: gemv_rows_vnni<B, 1, D>(L, P, levels, out, c0, c1, m0); break;            \
    case 2: gemv_rows_vnni<B, 2, D>(L, P, levels, out, c0, c1, m0); break;            \
    case 3: gemv_rows_vnni<B, 3, D>(L, P, levels, out, c0, c1, m0); break;            \
    default: gemv_rows_vnni<B, 4, D>(L, P, levels, out, c0, c1, m0); break;           \
  }
          if (path == kVnni) {
            if (bits == 4) { RS_CALL(4, 1) } else if (bits == 5) { RS_CALL(5, 1) } else { RS_CALL(8, 1) }
          } else {
            if (bits == 4) { RS_CALL(4, kDigits) } else if (bits == 5) { RS_CALL(5, kDigits) } else { RS_CALL(8, kDigits) }
          }
#undef RS_CALL
        }
      }
      return 0;
    }
    path = kAvx512;  // the VNNI conditions imply the float path's
  }

  // activations: padded to whole groups (the padding codes then meet zeros), int8-rounded for
  // act_bits=8
  const int64_t Kp = ng * G;
  std::vector<float> xp(static_cast<size_t>(M * Kp), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    if (act_bits == 8) quantize_row(x + m * K, K, G, Kp, xp.data() + m * Kp);
    else std::memcpy(xp.data() + m * Kp, x + m * K, K * sizeof(float));
  }
  const int64_t chunk = std::max<int64_t>(8, N / (16 * nt) + 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(N, c0 + chunk);
    if (path == kGeneric) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t mb = std::min<int64_t>(kMaxRows, M - m0);
        // y rows m0.. : shift x and y by m0 rows
        gemv_rows_generic(L, xp.data() + m0 * Kp, mb, Kp, out + m0 * N, c0, c1);
      }
      continue;
    }
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m0);
#define RS_CALL(DEC)                                                                          \
  switch (mb) {                                                                              \
    case 1: gemv_rows_avx512<DEC, 1>(L, &aux, xp.data(), Kp, out, c0, c1, m0); break;        \
    case 2: gemv_rows_avx512<DEC, 2>(L, &aux, xp.data(), Kp, out, c0, c1, m0); break;        \
    case 3: gemv_rows_avx512<DEC, 3>(L, &aux, xp.data(), Kp, out, c0, c1, m0); break;        \
    default: gemv_rows_avx512<DEC, 4>(L, &aux, xp.data(), Kp, out, c0, c1, m0); break;       \
  }
      if (bits == 4) { RS_CALL(Dec4) }
      else if (bits == 5) { RS_CALL(Dec5) }
      else { RS_CALL(Dec8) }
#undef RS_CALL
    }
  }
  return 0;
}
