// Tile products of bf16 inputs on Intel AMX (TDPBF16PS), for CPUs that have it (Sapphire Rapids
// and later; the build adds -mamx-tile -mamx-bf16 -mavx512bf16 where /proc/cpuinfo lists them).
//
// Why AMX and not AVX512-BF16's dot product: on these cores VDPBF16PS issues at half the rate of
// an fp32 FMA, so it does the same flops per cycle as the fp32 kernels of tile_products_cpu.h;
// a TDPBF16PS does a 16 x 16 x 32 block per instruction, several times the fp32 rate.
//
// Row invariance holds as for the fp32 kernels: every fp32 element of a C tile is computed from
// its own row of A and column of B by the same sequence (bf16 pair products added in order of
// the contraction index, 32 at a time, one TDPBF16PS after the other), whatever its position in
// the tile and whatever the tile's neighbours hold. Shapes are padded with zeros to whole tiles
// (16 rows, 32 contraction elements); a padded element adds an exact 0. AMX treats bf16 denormal
// inputs as 0 and flushes denormal results to 0 (far below the tolerance of a bf16 result).
//
// Layouts (bf16 as uint16_t): A row-major [M, K] (row stride a_stride elements, K a multiple of
// 32), B "VNNI" [K / 2, N, 2] (pairs of consecutive contraction elements side by side), C fp32
// row-major [M, N] (row stride c_stride); M and N multiples of 16.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define MASKKV_HAVE_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace maskkv_cpu {
namespace amx {

constexpr int64_t kTileRows = 16;  // rows of a tile (M and N step)
constexpr int64_t kTileDepth = 32;  // bf16 contraction elements per TDPBF16PS

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Linux hands out the AMX tile state to a process only on request (once; it covers all threads).
inline bool available() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// The tile configuration (palette 1), per thread: all 8 tiles 16 rows x 64 bytes. Loaded at the
// start of every product (another library on this thread may have loaded its own).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C[m0 : m0 + 16*NM, n0 : n0 + 16*NN] (+)= A . B over k < K: tiles 0-3 hold C, 4-5 A, 6-7 B.
template <int NM, int NN>
inline void block(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t n, int64_t K,
                  float* c, int64_t c_stride, bool accumulate) {
  const int64_t ab = a_stride * 2, bb = n * 4, cb = c_stride * 4;
  float* c1 = c + kTileRows;
  float* c2 = c + kTileRows * c_stride;
  float* c3 = c2 + kTileRows;
  if (accumulate) {
    _tile_loadd(0, c, cb);
    if constexpr (NN == 2) _tile_loadd(1, c1, cb);
    if constexpr (NM == 2) _tile_loadd(2, c2, cb);
    if constexpr (NM == 2 && NN == 2) _tile_loadd(3, c3, cb);
  } else {
    _tile_zero(0);
    if constexpr (NN == 2) _tile_zero(1);
    if constexpr (NM == 2) _tile_zero(2);
    if constexpr (NM == 2 && NN == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += kTileDepth) {
    _tile_loadd(4, a + k, ab);
    if constexpr (NM == 2) _tile_loadd(5, a + kTileRows * a_stride + k, ab);
    const uint16_t* bk = b + k * n;  // row k / 2 of [K / 2, n, 2]
    _tile_loadd(6, bk, bb);
    if constexpr (NN == 2) _tile_loadd(7, bk + 2 * kTileRows, bb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NN == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NM == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NM == 2 && NN == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, cb);
  if constexpr (NN == 2) _tile_stored(1, c1, cb);
  if constexpr (NM == 2) _tile_stored(2, c2, cb);
  if constexpr (NM == 2 && NN == 2) _tile_stored(3, c3, cb);
}

// C [M, N] (+)= A [M, K] . B (VNNI [K / 2, N, 2]); M, N multiples of 16, K of 32.
inline void matmul(const uint16_t* a, int64_t a_stride, int64_t M, const uint16_t* b, int64_t N,
                   int64_t K, float* c, int64_t c_stride, bool accumulate) {
  configure();
  for (int64_t m = 0; m < M; m += 2 * kTileRows) {
    const bool m2 = m + 2 * kTileRows <= M;
    const uint16_t* am = a + m * a_stride;
    for (int64_t nn = 0; nn < N; nn += 2 * kTileRows) {
      const bool n2 = nn + 2 * kTileRows <= N;
      float* cm = c + m * c_stride + nn;
      const uint16_t* bn = b + 2 * nn;
      if (m2 && n2) block<2, 2>(am, a_stride, bn, N, K, cm, c_stride, accumulate);
      else if (m2) block<2, 1>(am, a_stride, bn, N, K, cm, c_stride, accumulate);
      else if (n2) block<1, 2>(am, a_stride, bn, N, K, cm, c_stride, accumulate);
      else block<1, 1>(am, a_stride, bn, N, K, cm, c_stride, accumulate);
    }
  }
  _tile_release();
}

// Transposes a 16 x 16 block of 32-bit elements held in 16 registers (row i in x[i]).
inline void transpose16x16(__m512i x[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
  }
  // u[4i + m], 128-bit lane L: column 4L + m of rows 4i .. 4i + 3
  __m512i u[16];
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // column 4L + m: lane L of u[m], u[4 + m], u[8 + m], u[12 + m]
    const __m512i x0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
    x[m] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    x[4 + m] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    x[8 + m] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    x[12 + m] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// 32 bf16 of row x[0 : n) (n <= 32), zero past n.
inline __m512i load_bf16(const uint16_t* x, int64_t n) {
  const __mmask32 m = n >= 32 ? ~__mmask32{0} : ((__mmask32{1} << n) - 1);
  return _mm512_maskz_loadu_epi16(m, x);
}

// The tile's rows q [tq, D] (bf16, row stride q_stride, unit stride along D) as VNNI
// [Kp / 2, ld, 2]: element (d, r) at ((d / 2) * ld + r) * 2 + d % 2, zero past tq and past D
// (Kp = D rounded up to 32; ld a multiple of 16). qp holds Kp * ld elements. Viewed as 32-bit
// pairs this is a transpose of [ld, Kp / 2] into [Kp / 2, ld], 16 x 16 pairs at a time.
inline void pack_vnni_rows(const uint16_t* q, int64_t q_stride, int64_t tq, int64_t D,
                           int64_t ld, uint16_t* qp) {
  const int64_t Kp = round_up(D, kTileDepth);
  uint32_t* out = reinterpret_cast<uint32_t*>(qp);
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    for (int64_t d0 = 0; d0 < Kp; d0 += 32) {
      __m512i x[16];
      for (int64_t i = 0; i < 16; ++i)
        x[i] = r0 + i < tq && d0 < D ? load_bf16(q + (r0 + i) * q_stride + d0, D - d0)
                                     : _mm512_setzero_si512();
      transpose16x16(x);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(out + (d0 / 2 + i) * ld + r0, x[i]);
    }
  }
}

// Rows [0, n) of x [n, D] (bf16, row stride x_stride) as [round_up(n, 16), Kp] row-major with
// zero padding, into buf; returns the rows themselves (and their stride) when no padding is due.
inline const uint16_t* padded_rows(const uint16_t* x, int64_t x_stride, int64_t n, int64_t D,
                                   uint16_t* buf, int64_t& stride) {
  const int64_t Kp = round_up(D, kTileDepth), np = round_up(n, kTileRows);
  if (D == Kp && n == np) {
    stride = x_stride;
    return x;
  }
  std::fill(buf, buf + np * Kp, uint16_t{0});
  for (int64_t i = 0; i < n; ++i) std::copy(x + i * x_stride, x + i * x_stride + D, buf + i * Kp);
  stride = Kp;
  return buf;
}

// Probabilities p key-major fp32 [bk, ld] (lanes r < ld all written) as bf16 VNNI
// [round_up(bk, 32) / 2, ld, 2] (pairs of consecutive keys), zero for keys past bk. bf16 by
// round-to-nearest-even, as flash attention's p.to(v.dtype).
inline void pack_vnni_probs(const float* p, int64_t bk, int64_t ld, uint32_t* pp) {
  const int64_t bkp = round_up(bk, kTileDepth);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < bkp; j += 2) {
    uint32_t* out = pp + (j / 2) * ld;
    for (int64_t r = 0; r < ld; r += 16) {
      const __m512 lo = j < bk ? _mm512_loadu_ps(p + j * ld + r) : zero;
      const __m512 hi = j + 1 < bk ? _mm512_loadu_ps(p + (j + 1) * ld + r) : zero;
      const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
      const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
      _mm512_storeu_si512(out + r, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
  }
}

// Values v [bk, D] (bf16, row stride v_stride) transposed: vt [Kp, round_up(bk, 32)] (Kp = D
// rounded up to 32), zero padded. Viewed as 32-bit pairs of consecutive keys, 16 pairs (32 keys)
// x 16 columns at a time: interleave two key rows into pairs, then transpose the pairs.
inline void transpose_values(const uint16_t* v, int64_t v_stride, int64_t bk, int64_t D,
                             uint16_t* vt) {
  const int64_t Kp = round_up(D, kTileDepth), bkp = round_up(bk, kTileDepth);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j0 = 0; j0 < bkp; j0 += 32) {
    for (int64_t c0 = 0; c0 < Kp; c0 += 16) {
      const __mmask16 m = c0 >= D ? 0 : D - c0 >= 16 ? 0xFFFF : (1u << (D - c0)) - 1;
      __m512i x[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = j0 + 2 * i;
        const __m256i lo = j < bk ? _mm256_maskz_loadu_epi16(m, v + j * v_stride + c0) : zero;
        const __m256i hi =
            j + 1 < bk ? _mm256_maskz_loadu_epi16(m, v + (j + 1) * v_stride + c0) : zero;
        x[i] = _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      }
      transpose16x16(x);
      for (int64_t i = 0; i < 16; ++i)
        _mm512_storeu_si512(vt + (c0 + i) * bkp + j0, x[i]);
    }
  }
}

// acc_t [>= Dp, ld] (fp32, row c holds column c of every row) back to acc [tq, Dp] (row stride
// Dp; Dp and ld multiples of 16).
inline void untranspose_acc(const float* acc_t, int64_t ld, int64_t tq, int64_t Dp, float* acc) {
  for (int64_t r0 = 0; r0 < tq; r0 += 16) {
    for (int64_t c0 = 0; c0 < Dp; c0 += 16) {
      __m512i x[16];
      for (int64_t i = 0; i < 16; ++i)
        x[i] = _mm512_loadu_si512(acc_t + (c0 + i) * ld + r0);
      transpose16x16(x);
      for (int64_t i = 0; i < 16 && r0 + i < tq; ++i)
        _mm512_storeu_si512(acc + (r0 + i) * Dp + c0, x[i]);
    }
  }
}

}  // namespace amx
}  // namespace maskkv_cpu

#endif
