// Fused select on the CPU: mask / window scoring, SnapKV pooling, top-k with the K/V gather.
//
// score_keys: per (batch row b, KV head g), the G*M scoring rows are scored against the keys in
// blocks of kKeyBlock (one fp32 tile at a time, never [M, L]): pass 1 is an online softmax giving
// each row's log-sum-exp (skipped when the attention forward's LSE is given), pass 2 recomputes
// each tile and adds exp(s - lse) into one vector of column sums.
//
// Tiles are key-major, [keys, rows], and computed by the product kernel of tile_products_cpu.h
// (bf16 inputs on a CPU with AMX: amx_tiles_cpu.h, the same guarantees) rather than by BLAS: every
// logit is one fused multiply-add chain over d = 0..D-1 (on AMX: one TDPBF16PS sequence over d),
// the same instructions whatever the key's position in its block and whatever the tile's shape, and
// every per-key reduction below runs over the contiguous rows with the same instructions for every
// key. Bitwise-identical keys therefore get bitwise-identical scores, and ties go to the lower
// position as the ranking rule says. (BLAS rounds by position: in a query-major product the keys
// sit in vector lanes, whose tail lanes round differently; in a key-major one MKL still takes other
// kernels for skinny tiles of 1-3 rows, a GEMV for one row among them.)
//
// A row whose softmax is undefined (a NaN or +inf logit) carries no mass, like a row without any
// valid key, as in the reference: its log-sum-exp is NaN. Scores are then finite (at most G*M)
// without a given LSE, so window mode's +inf window positions always rank first.
//
// topk_gather: per (b, g), std::nth_element under the ranking rule of DESIGN.md (higher score
// first, NaN below -inf, ties to the lower position), the kept positions sorted ascending, rows
// copied bit for bit.
#include "amx_tiles_cpu.h"
#include "tile_products_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace maskkv_cpu {

namespace {

constexpr int64_t kRowTile = 256;   // scoring rows per tile
constexpr int64_t kKeyBlock = 512;  // keys per tile

// Ranking rule: true when position a ranks before position b.
struct Better {
  const float* s;
  bool operator()(int32_t a, int32_t b) const {
    const float x = s[a], y = s[b];
    const bool nx = std::isnan(x), ny = std::isnan(y);
    if (nx != ny) return ny;  // a number beats NaN (NaN ranks below -inf)
    if (!nx && x != y) return x > y;
    return a < b;  // equal scores (and -0.0 == +0.0), or both NaN: the lower position
  }
};

// exp with IEEE edges: exp_u20 clamps its argument first, so NaN and overflowing arguments come
// out as a large finite number; here NaN stays NaN and overflow is +inf, as in the reference
// (with a given LSE a non-finite key's score is NaN or +inf there, and ranks accordingly).
inline Vec exp_ieee(const Vec& x) {
  const Vec overflow = (x != x) | (x > Vec(88.72283935546875f));  // NaN, or above ln(FLT_MAX)
  return Vec::blendv(x.exp_u20(), x * Vec(std::numeric_limits<float>::infinity()), overflow);
}

// A float whose bits are all ones: the "true" lane of a blendv mask.
inline float all_ones() {
  const uint32_t bits = 0xFFFFFFFFu;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Online log-sum-exp state of a tile's rows, updated with one key-major block of unscaled logits
// x ([bk, ld], rows r < tq): per row, m = max (NaN and +inf stick), l = sum exp(x * scale - m).
void update_lse(const float* x, int64_t bk, int64_t tq, int64_t ld, float scale, float* row_m,
                float* row_l) {
  const Vec vs(scale), zero(0.0f);
  for (int64_t r = 0; r < tq; r += Vec::size()) {
    const int64_t c = std::min<int64_t>(Vec::size(), tq - r);
    Vec bm(kNegInf);
    for (int64_t j = 0; j < bk; ++j)
      bm = at::vec::maximum(bm, Vec::loadu(x + j * ld + r, c) * vs);
    const Vec m_old = Vec::loadu(row_m + r, c);
    const Vec m_new = at::vec::maximum(m_old, bm);
    // No finite maximum (no key yet, or a NaN / +inf logit): subtract 0, the sums are unused.
    const Vec m_sub = Vec::blendv(m_new, zero, (m_new - m_new) != zero);
    Vec sum(0.0f);
    for (int64_t j = 0; j < bk; ++j)
      sum = sum + (Vec::loadu(x + j * ld + r, c) * vs - m_sub).exp_u20();
    const Vec l = Vec::loadu(row_l + r, c) * (m_old - m_sub).exp_u20() + sum;
    m_new.store(row_m + r, c);
    l.store(row_l + r, c);
  }
}

// log-sum-exp of one row from its online state: -inf without any key, NaN when undefined.
inline float finish_lse(float m, float l) {
  if (std::isnan(m) || m == std::numeric_limits<float>::infinity())
    return std::numeric_limits<float>::quiet_NaN();
  return m == kNegInf ? kNegInf : m + std::log(l);
}

// cols[j] += sum over the tile's rows r < tq with ok[r] of exp(x[j, r] * scale - lse[r]), for
// one key-major block x [bk, ld]: the same instructions for every key j. IEEE: a given LSE, which
// can leave NaN and overflowing arguments (with a computed one, an ok row's are finite or -inf).
template <bool IEEE>
void add_column_sums(const float* x, int64_t bk, int64_t tq, int64_t ld, float scale,
                     const float* lse, const float* ok, float* cols) {
  const Vec vs(scale), zero(0.0f);
  for (int64_t j = 0; j < bk; ++j) {
    const float* xj = x + j * ld;
    Vec acc(0.0f);
    for (int64_t r = 0; r < tq; r += Vec::size()) {
      const int64_t c = std::min<int64_t>(Vec::size(), tq - r);
      const Vec arg = Vec::loadu(xj + r, c) * vs - Vec::loadu(lse + r, c);
      const Vec p = IEEE ? exp_ieee(arg) : arg.exp_u20();
      acc = acc + Vec::blendv(zero, p, Vec::loadu(ok + r, c));  // lanes past tq load ok = 0
    }
    cols[j] += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> score_keys(const Tensor& q, const Tensor& k, const Tensor& first,
                                      const c10::optional<Tensor>& lse, int64_t prompt_len,
                                      bool window, double scale_d, bool need_mass) {
  check_float(q, "q");
  check_float(k, "k");
  check_dim(q, 4, "q", "[B, Hq, M, D]");
  check_dim(k, 4, "k", "[B, Hkv, L, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k: expected q's dtype ", q.scalar_type(),
              ", got ", k.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), M = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), P = prompt_len;
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "k: expected [B=", B,
              ", Hkv dividing Hq=", Hq, ", L, D=", D, "], got ", k.sizes());
  TORCH_CHECK(0 <= P && P <= L, "prompt_len: expected an int in [0, L=", L, "], got ", P);
  TORCH_CHECK(!window || M <= P, "q: expected W=", M, " <= prompt_len=", P, " (window mode)");
  check_int32(first, "first", {B});
  check_last_dim_contiguous(k, "k");
  const int64_t G = Hq / Hkv, GM = G * M;
  const bool has_lse = lse.has_value() && lse->defined();
  Tensor lse_f;
  if (has_lse) {
    TORCH_CHECK(!window, "lse: expected None in window mode");
    check_cpu(*lse, "lse");
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "lse: expected dtype float32, got ",
                lse->scalar_type());
    TORCH_CHECK(lse->sizes() == at::IntArrayRef({B, Hq, M}), "lse: expected shape [", B, ", ",
                Hq, ", ", M, "], got ", lse->sizes());
    lse_f = lse->contiguous();
  }
  const int32_t* first_p = first.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= first_p[b] && first_p[b] <= P, "first: expected values in [0, prompt_len=",
                P, "], got ", first_p[b], " at ", b);
  }
  const float scale = static_cast<float>(scale_d);
  const int64_t key_end = window ? P : L;                        // softmax over these keys
  const int64_t col_end = (window || !need_mass) ? P : L;        // column sums needed up to here
  Tensor scores = at::zeros({B, Hkv, P}, q.options().dtype(at::kFloat));
  Tensor mass = at::zeros({B, Hkv}, q.options().dtype(at::kFloat));
  float* scores_p = scores.data_ptr<float>();
  float* mass_p = mass.data_ptr<float>();
  const float* lse_p = has_lse ? lse_f.data_ptr<float>() : nullptr;
  if (B * Hkv == 0 || GM == 0 || D == 0) return {scores, mass};
  const float ok_true = all_ones();
#ifdef MASKKV_HAVE_AMX
  // bf16 logits on AMX (amx_tiles_cpu.h) where the CPU has it: chosen by the dtype alone.
  const bool amx_path = q.scalar_type() == at::kBFloat16 && amx::available();
#else
  const bool amx_path = false;
#endif

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const auto f32 = q.options().dtype(at::kFloat);
    const int64_t tq_max = std::min(GM, kRowTile);
    Tensor qbuf = at::empty({amx_path ? 0 : tq_max * D}, f32);
    Tensor kbuf = at::empty({amx_path ? 0 : kKeyBlock * D}, f32);
    const int64_t ld_max = (tq_max + Vec::size() - 1) / Vec::size() * Vec::size();
    const int64_t Kp = (D + 31) / 32 * 32;      // D rounded up to AMX's contraction depth
    std::vector<float> st(kKeyBlock * ld_max);  // one key-major block of logits, [bk, ld]
    std::vector<float> qt(amx_path ? 0 : D * ld_max);  // the tile's rows, packed by pack_rows
    std::vector<uint16_t> q_vnni(amx_path ? Kp * ld_max : 0), k_pad(amx_path ? kKeyBlock * Kp : 0);
    std::vector<float> cols, row_m(tq_max), row_l(tq_max), row_lse(tq_max), row_ok(tq_max);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, g = s % Hkv, fb = first_p[b];
      const Tensor rows = q[b].narrow(0, g * G, G).reshape({GM, D});  // row r = h * M + m
      const Tensor kh = k[b][g];                                        // [L, D]
      cols.assign(std::max<int64_t>(col_end - fb, 0), 0.0f);
      for (int64_t r0 = 0; r0 < GM; r0 += kRowTile) {
        const int64_t tq = std::min(kRowTile, GM - r0);
        const int64_t ld = (tq + Vec::size() - 1) / Vec::size() * Vec::size();
#ifdef MASKKV_HAVE_AMX
        if (amx_path) {
          Tensor qr = rows.narrow(0, r0, tq);
          if (D > 1 && qr.stride(1) != 1) qr = qr.contiguous();
          amx::pack_vnni_rows(static_cast<const uint16_t*>(qr.data_ptr()), qr.stride(0), tq, D,
                              ld, q_vnni.data());
        }
#endif
        if (!amx_path) {
          const Tensor qf = rows_as_float(rows, r0, tq, qbuf);
          pack_rows(qf.data_ptr<float>(), qf.stride(0), tq, D, ld, qt.data());
        }
        auto logits = [&](int64_t j0, int64_t bk) {  // fp32 [bk, ld] = k . q, unscaled
#ifdef MASKKV_HAVE_AMX
          if (amx_path) {
            const int64_t ks = kh.stride(0);
            int64_t a_stride;
            const uint16_t* a = amx::padded_rows(static_cast<const uint16_t*>(kh.data_ptr()) +
                                                     j0 * ks,
                                                 ks, bk, D, k_pad.data(), a_stride);
            amx::matmul(a, a_stride, (bk + 15) / 16 * 16, q_vnni.data(), ld, Kp, st.data(), ld,
                        false);
            return st.data();
          }
#endif
          const Tensor kf = rows_as_float(kh, j0, bk, kbuf);
          key_major_logits(kf.data_ptr<float>(), kf.stride(0), bk, qt.data(), D, ld, st.data());
          return st.data();
        };
        if (has_lse) {
          for (int64_t i = 0; i < tq; ++i) {
            const int64_t r = r0 + i;
            row_lse[i] = lse_p[(b * Hq + g * G + r / M) * M + r % M];
          }
        } else {  // pass 1: online log-sum-exp over the valid keys [fb, key_end)
          std::fill(row_m.begin(), row_m.end(), kNegInf);
          std::fill(row_l.begin(), row_l.end(), 0.0f);
          for (int64_t j0 = fb; j0 < key_end; j0 += kKeyBlock) {
            const int64_t bk = std::min(kKeyBlock, key_end - j0);
            update_lse(logits(j0, bk), bk, tq, ld, scale, row_m.data(), row_l.data());
          }
          for (int64_t i = 0; i < tq; ++i) row_lse[i] = finish_lse(row_m[i], row_l[i]);
        }
        bool any_ok = false;
        for (int64_t i = 0; i < tq; ++i) {
          const int64_t r = r0 + i;
          // Only a row with a log-sum-exp above -inf carries mass (NaN: undefined softmax);
          // padding window queries vote for nothing.
          bool ok = row_lse[i] > kNegInf;
          if (window) ok = ok && (P - M + r % M) >= fb;
          row_ok[i] = ok ? ok_true : 0.0f;
          if (!ok) row_lse[i] = 0.0f;
          any_ok = any_ok || ok;
        }
        if (!any_ok) continue;
        // pass 2: column sums of the probabilities over [fb, col_end)
        for (int64_t j0 = fb; j0 < col_end; j0 += kKeyBlock) {
          const int64_t bk = std::min(kKeyBlock, col_end - j0);
          (has_lse ? add_column_sums<true> : add_column_sums<false>)(
              logits(j0, bk), bk, tq, ld, scale, row_lse.data(), row_ok.data(),
              cols.data() + (j0 - fb));
        }
      }
      float* out = scores_p + s * P;
      for (int64_t j = fb; j < P; ++j) out[j] = cols[j - fb];
      if (col_end > P) {
        double m = 0.0;
        for (int64_t j = std::max<int64_t>(P, fb); j < col_end; ++j) m += cols[j - fb];
        mass_p[s] = static_cast<float>(m);
      }
    }
  });
  return {scores, mass};
}

Tensor pool_window(const Tensor& raw, const Tensor& first, int64_t window, int64_t pool,
                   int64_t pool_kernel) {
  check_cpu(raw, "raw");
  check_dim(raw, 3, "raw", "[B, Hkv, P]");
  TORCH_CHECK(raw.scalar_type() == at::kFloat, "raw: expected dtype float32, got ",
              raw.scalar_type());
  const int64_t B = raw.size(0), Hkv = raw.size(1), P = raw.size(2);
  check_int32(first, "first", {B});
  TORCH_CHECK(0 <= window && window <= P, "window: expected an int in [0, P=", P, "], got ",
              window);
  TORCH_CHECK(0 <= pool && pool <= 2, "pool: expected 0 (none), 1 (max) or 2 (avg), got ", pool);
  TORCH_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "pool_kernel: expected an odd int >= 1, got ",
              pool_kernel);
  const Tensor src = raw.contiguous();
  Tensor out = at::empty_like(src);
  const float* in_p = src.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int32_t* first_p = first.data_ptr<int32_t>();
  const int64_t pw = P - window, pad = pool_kernel / 2;
  const bool pooled = pool != 0 && pool_kernel > 1;
  at::parallel_for(0, B * Hkv, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const float* x = in_p + s * P;
      float* y = out_p + s * P;
      // Pooling runs over [0, P - W) with padding outside it (-inf for max, 0 counted for avg).
      for (int64_t j = 0; j < pw; ++j) {
        if (!pooled) {
          y[j] = x[j];
          continue;
        }
        const int64_t lo = std::max<int64_t>(j - pad, 0), hi = std::min<int64_t>(j + pad, pw - 1);
        if (pool == 1) {
          float m = x[lo];
          for (int64_t t = lo + 1; t <= hi; ++t) m = (std::isnan(x[t]) || x[t] > m) ? x[t] : m;
          y[j] = m;
        } else {
          float sum = 0.0f;
          for (int64_t t = lo; t <= hi; ++t) sum += x[t];
          y[j] = sum / static_cast<float>(pool_kernel);
        }
      }
      for (int64_t j = pw; j < P; ++j) y[j] = std::numeric_limits<float>::infinity();
      const int64_t fb = std::min<int64_t>(std::max<int32_t>(first_p[s / Hkv], 0), P);
      for (int64_t j = 0; j < fb; ++j) y[j] = 0.0f;  // padding
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> topk_gather(const Tensor& scores, const Tensor& k,
                                               const Tensor& v, const Tensor& budgets,
                                               const Tensor& first, const Tensor& cu_seqlens,
                                               int64_t n) {
  check_cpu(scores, "scores");
  check_dim(scores, 3, "scores", "[B, Hkv, P]");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores: expected dtype float32, got ",
              scores.scalar_type());
  const int64_t B = scores.size(0), Hkv = scores.size(1), P = scores.size(2);
  check_float(k, "k");
  check_dim(k, 4, "k", "[B, Hkv, L, D]");
  TORCH_CHECK(k.size(0) == B && k.size(1) == Hkv && k.size(2) >= P, "k: expected [B=", B,
              ", Hkv=", Hkv, ", L>=", P, ", D], got ", k.sizes());
  check_float(v, "v");
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "v: expected k's shape ", k.sizes(), " and dtype ", k.scalar_type(), ", got ",
              v.sizes(), " ", v.scalar_type());
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_int32(budgets, "budgets", {B, Hkv});
  check_int32(first, "first", {B});
  check_int32(cu_seqlens, "cu_seqlens", {B * Hkv + 1});
  const int32_t* bud = budgets.data_ptr<int32_t>();
  const int32_t* first_p = first.data_ptr<int32_t>();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[B * Hkv] == n, "cu_seqlens: expected to start at 0 and end at n=",
              n, ", got ", cu[0], " ... ", cu[B * Hkv]);
  for (int64_t s = 0; s < B * Hkv; ++s) {
    const int64_t fb = first_p[s / Hkv];
    TORCH_CHECK(0 <= fb && fb <= P, "first: expected values in [0, P=", P, "], got ", fb);
    TORCH_CHECK(0 <= bud[s] && bud[s] <= P - fb, "budgets: expected values in [0, prompt_lens[",
                s / Hkv, "]=", P - fb, "], got ", bud[s], " at segment ", s);
    TORCH_CHECK(cu[s + 1] - cu[s] == bud[s], "cu_seqlens: expected the prefix sum of budgets");
  }
  const Tensor sc = scores.contiguous();
  const int64_t D = k.size(3), es = k.element_size();
  Tensor k_out = at::empty({n, D}, k.options());
  Tensor v_out = at::empty({n, D}, v.options());
  Tensor pos = at::empty({n}, budgets.options());
  const float* sp = sc.data_ptr<float>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kop = static_cast<char*>(k_out.data_ptr());
  char* vop = static_cast<char*>(v_out.data_ptr());
  int32_t* pp = pos.data_ptr<int32_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> idx;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, g = s % Hkv, fb = first_p[b], kb = bud[s];
      if (kb == 0) continue;
      idx.resize(P - fb);
      for (int64_t j = fb; j < P; ++j) idx[j - fb] = static_cast<int32_t>(j);
      const Better better{sp + s * P};
      if (kb < static_cast<int64_t>(idx.size()))
        std::nth_element(idx.begin(), idx.begin() + kb, idx.end(), better);
      std::sort(idx.begin(), idx.begin() + kb);  // ascending positions
      for (int64_t t = 0; t < kb; ++t) {
        const int64_t row = cu[s] + t, p = idx[t];
        pp[row] = idx[t];
        const int64_t ko = (b * k.stride(0) + g * k.stride(1) + p * k.stride(2)) * es;
        const int64_t vo = (b * v.stride(0) + g * v.stride(1) + p * v.stride(2)) * es;
        std::memcpy(kop + row * D * es, kp + ko, D * es);
        std::memcpy(vop + row * D * es, vp + vo, D * es);
      }
    }
  });
  return {k_out, v_out, pos};
}

}  // namespace maskkv_cpu
