// Matrix products of one tile, by register-tiled at::vec kernels of our own instead of BLAS.
//
// Why not at::mm (MKL): BLAS picks its kernels, blocking and threads by the matrix shape (a GEMV
// for one row, other kernels for 2-3 rows, vector-lane tails for the last columns, threads for
// a product that is not inside a parallel region), so the same row rounds differently in tiles of
// different shapes. Here every output element is one fused multiply-add chain over the
// contraction index in increasing order, the same instructions whatever its position in the tile
// and whatever the tile's shape: a row's result depends on that row's inputs alone. Scores of
// identical keys are then identical (score_keys' ranking ties), and a query row of ragged
// attention rounds the same whether its request runs alone or in any batch (batch invariance).
//
// - key_major_logits: st[j, r] = sum_d k[j, d] * q[r, d] for a block of keys j and the tile's
//   rows r, key-major ([bk, ld], ld = rows rounded up to a whole vector), the rows packed by
//   pack_rows into panels so that they sit in vector lanes;
// - accumulate_pv: acc[r, :] += sum_j p[j, r] * v[j, :] with p key-major as above and acc
//   row-major [rows, Dp] (Dp = D rounded up to a whole vector).
//
// These serve fp32 and fp16 inputs everywhere, and bf16 inputs on CPUs without AMX; bf16 inputs
// on a CPU with AMX take amx_tiles_cpu.h's products (the same row invariance, several times the
// speed).
#pragma once

#include "maskkv_cpu.h"

namespace maskkv_cpu {

// Register budget: AVX-512 has 32 vector registers, AVX2 16.
constexpr int64_t kPanelVecs = Vec::size() >= 16 ? 4 : 2;  // widest row panel, in vectors
constexpr int64_t kTileKeys = 4;
constexpr int64_t kPanelKeys = Vec::size() >= 16 ? 6 : 4;  // 24 (AVX-512) or 8 (AVX2) accumulators
constexpr int64_t kPvRows = 4;  // accumulate_pv: rows per register tile

// `n` rounded up to a whole number of vectors.
inline int64_t round_to_vec(int64_t n) { return (n + Vec::size() - 1) / Vec::size() * Vec::size(); }

namespace detail {

// Logits of NK keys (row i at k + i * k_stride) against one panel of NV vectors of rows:
// st[i, lanes] for i < NK. Every accumulator lane runs the same fmadd chain over d = 0..D-1.
template <int64_t NK, int64_t NV>
inline void logits_tile(const float* k, int64_t k_stride, const float* panel, int64_t D,
                        int64_t ld, float* st) {
  constexpr int64_t W = Vec::size();
  Vec acc[NK][NV];
  for (int64_t i = 0; i < NK; ++i)
    for (int64_t v = 0; v < NV; ++v) acc[i][v] = Vec(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    Vec qv[NV];
    for (int64_t v = 0; v < NV; ++v) qv[v] = Vec::loadu(panel + (d * NV + v) * W);
    for (int64_t i = 0; i < NK; ++i) {
      const Vec kb(k[i * k_stride + d]);
      for (int64_t v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(kb, qv[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < NK; ++i)
    for (int64_t v = 0; v < NV; ++v) acc[i][v].store(st + i * ld + v * W);
}

// All bk keys against one panel of NV vectors of rows: NK keys at a time.
template <int64_t NK, int64_t NV>
void logits_panel(const float* k, int64_t k_stride, int64_t bk, const float* panel, int64_t D,
                  int64_t ld, float* st) {
  int64_t j = 0;
  for (; j + NK <= bk; j += NK)
    logits_tile<NK, NV>(k + j * k_stride, k_stride, panel, D, ld, st + j * ld);
  for (; j < bk; ++j) logits_tile<1, NV>(k + j * k_stride, k_stride, panel, D, ld, st + j * ld);
}

// acc[r, c] += sum_j p[j * ld + r] * v[j * v_stride + c] for NR rows and NV vectors of columns:
// every accumulator lane runs the same fmadd chain over j = 0..bk-1.
template <int64_t NR, int64_t NV>
inline void pv_tile(const float* p, int64_t ld, int64_t bk, const float* v, int64_t v_stride,
                    float* acc, int64_t acc_stride) {
  constexpr int64_t W = Vec::size();
  Vec a[NR][NV];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t c = 0; c < NV; ++c) a[r][c] = Vec::loadu(acc + r * acc_stride + c * W);
  for (int64_t j = 0; j < bk; ++j) {
    Vec vv[NV];
    for (int64_t c = 0; c < NV; ++c) vv[c] = Vec::loadu(v + j * v_stride + c * W);
    for (int64_t r = 0; r < NR; ++r) {
      const Vec pb(p[j * ld + r]);
      for (int64_t c = 0; c < NV; ++c) a[r][c] = at::vec::fmadd(pb, vv[c], a[r][c]);
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t c = 0; c < NV; ++c) a[r][c].store(acc + r * acc_stride + c * W);
}

// pv_tile over rows [0, tq) for one column panel of NV vectors: kPvRows rows at a time.
template <int64_t NV>
void pv_panel(const float* p, int64_t ld, int64_t bk, int64_t tq, const float* v,
              int64_t v_stride, float* acc, int64_t acc_stride) {
  int64_t r = 0;
  for (; r + kPvRows <= tq; r += kPvRows)
    pv_tile<kPvRows, NV>(p + r, ld, bk, v, v_stride, acc + r * acc_stride, acc_stride);
  for (; r < tq; ++r) pv_tile<1, NV>(p + r, ld, bk, v, v_stride, acc + r * acc_stride, acc_stride);
}

}  // namespace detail

// Panel widths (in vectors) covering n lanes (a multiple of the vector width): full panels of
// kPanelVecs, then one narrower for the rest.
template <typename F>
void for_each_panel(int64_t n, F&& f) {
  constexpr int64_t W = Vec::size();
  int64_t r = 0;
  for (; r + kPanelVecs * W <= n; r += kPanelVecs * W) f(r, kPanelVecs);
  for (; r + 2 * W <= n; r += 2 * W) f(r, 2);
  for (; r < n; r += W) f(r, 1);
}

// The tile's rows [tq, D] (row stride q_stride) transposed into panels: panel p of width w
// vectors holds rows [r, r + w*W) as [D, w*W], contiguous (its D rows stay in L1 while the keys
// stream past), at qp + r*D; rows past tq are zero. qp holds D * ld floats.
inline void pack_rows(const float* q, int64_t q_stride, int64_t tq, int64_t D, int64_t ld,
                      float* qp) {
  for_each_panel(ld, [&](int64_t r, int64_t w) {
    const int64_t width = w * Vec::size();
    float* panel = qp + r * D;
    std::fill(panel, panel + D * width, 0.0f);
    for (int64_t i = r; i < std::min(tq, r + width); ++i)
      for (int64_t d = 0; d < D; ++d) panel[d * width + (i - r)] = q[i * q_stride + d];
  });
}

// Key-major logits of one block: st[j, r] = sum_d k[j, d] * q[r, d] (unscaled) for bk keys (row j
// at k + j * k_stride) and the ld packed rows of qp (pack_rows); st is [bk, ld].
inline void key_major_logits(const float* k, int64_t k_stride, int64_t bk, const float* qp,
                             int64_t D, int64_t ld, float* st) {
  for_each_panel(ld, [&](int64_t r, int64_t w) {
    if (w == kPanelVecs) {
      detail::logits_panel<kPanelKeys, kPanelVecs>(k, k_stride, bk, qp + r * D, D, ld, st + r);
    } else if (w == 2) {
      detail::logits_panel<kTileKeys, 2>(k, k_stride, bk, qp + r * D, D, ld, st + r);
    } else {
      detail::logits_panel<2 * kTileKeys, 1>(k, k_stride, bk, qp + r * D, D, ld, st + r);
    }
  });
}

// acc[r, :Dp] += sum_j p[j, r] * v[j, :Dp] for rows r < tq: p key-major [bk, ld], v [bk, Dp]
// (row stride v_stride, Dp a multiple of the vector width), acc [tq, Dp] (row stride acc_stride).
inline void accumulate_pv(const float* p, int64_t ld, int64_t bk, int64_t tq, const float* v,
                          int64_t v_stride, int64_t Dp, float* acc, int64_t acc_stride) {
  for_each_panel(Dp, [&](int64_t c, int64_t w) {
    if (w == kPanelVecs) {
      detail::pv_panel<kPanelVecs>(p, ld, bk, tq, v + c, v_stride, acc + c, acc_stride);
    } else if (w == 2) {
      detail::pv_panel<2>(p, ld, bk, tq, v + c, v_stride, acc + c, acc_stride);
    } else {
      detail::pv_panel<1>(p, ld, bk, tq, v + c, v_stride, acc + c, acc_stride);
    }
  });
}

}  // namespace maskkv_cpu
