// Ragged attention on the CPU: per (request b, KV head g), the query rows of the KV head's G
// query heads (GQA packing, K/V never repeated) attend to [kept segment || tail] with one online
// softmax, flash style: tiles of up to kRowTile rows x kKeyBlock keys, the segment's keys first,
// then the tail's, never concatenated. fp32 accumulation whatever the input dtype.
//
// Both products of a tile (q . k and p . v) go through the kernels of tile_products_cpu.h, or for
// bf16 inputs on a CPU with AMX through amx_tiles_cpu.h (p rounded to bf16 for p . v, as flash
// attention does), not BLAS, and the softmax runs in the rows' vector lanes: every query row goes
// through the same instructions wherever it sits in its tile and whatever the tile's shape. A row's
// bits thus depend only on its own inputs, its segment's and tail's lengths (the key blocks) and
// the scale: a request's rows are the same alone or in any batch, in the dense or the varlen layout
// (batch invariance, what the serving engine needs to run one call for the whole batch).
//
// Non-finite inputs follow the reference (a softmax of IEEE logits): a NaN logit makes the row's
// output and LSE NaN; a +inf logit (and no NaN) gives output NaN, LSE +inf; a row whose logits
// are all -inf gives output NaN, LSE -inf; an inf or NaN value row reaches the output through
// 0 * inf = NaN even where its probability is 0. A row with no key at all is 0 with LSE -inf.
//
// Two layouts share the tile loop (attend_rows):
// - dense: q [B, Hq, Lq, D], tails [B, Hkv, Lt, D]; packed row r = h * Lq + i;
// - varlen: q [Nq, Hq, D] packed by request (cu_seqlens_q), tails [Nt, Hkv, D] packed by request
//   (cu_seqlens_tail, optionally placed by tail_starts); packed row r = i * G + h.
// In both, segment s = b * Hkv + g holds rows seg_starts[s] .. + len of k / v (seg_starts
// defaults to cu_seqlens[:-1], the packed layout). Only a segment's own rows are ever read.
#include "amx_tiles_cpu.h"
#include "tile_products_cpu.h"

#include <vector>

namespace maskkv_cpu {

namespace {
constexpr int64_t kRowTile = 256;
constexpr int64_t kKeyBlock = 256;

// Whether the tile products of this call run on AMX (amx_tiles_cpu.h): bf16 inputs on a CPU
// that has it. The choice depends on the dtype alone, never on a shape, so a request's rows take
// the same path alone or in any batch.
bool use_amx(const Tensor& q) {
#ifdef MASKKV_HAVE_AMX
  return q.scalar_type() == at::kBFloat16 && amx::available();
#else
  (void)q;
  return false;
#endif
}

// Scratch buffers of one parallel task (sized for the largest tile): tq_max rows of head dim D,
// Dp = D rounded up to a whole vector. fp32, except qbuf (the input dtype on the AMX path) and
// the AMX path's bf16 buffers (empty otherwise): Kp = D rounded up to 32.
struct Scratch {
  int64_t ld_max, Dp, Kp;
  bool amx;
  Tensor qbuf, kbuf, vbuf, acc;
  std::vector<float> qt, st, row_m, row_l, alpha, row_lse, acc_t;
  std::vector<uint16_t> q_vnni, k_pad, v_t;
  std::vector<uint32_t> p_vnni;
  Scratch(int64_t tq_max, int64_t D, const at::TensorOptions& in, bool amx_path)
      : ld_max(round_to_vec(tq_max)),
        Dp(round_to_vec(D)),
        Kp((D + 31) / 32 * 32),
        amx(amx_path),
        qbuf(at::empty({tq_max * D}, amx_path ? in : in.dtype(at::kFloat))),
        kbuf(at::empty({amx_path ? 0 : kKeyBlock * D}, in.dtype(at::kFloat))),
        vbuf(at::zeros({amx_path ? 0 : kKeyBlock * Dp}, in.dtype(at::kFloat))),  // padding 0
        acc(at::empty({tq_max, Dp}, in.dtype(at::kFloat))),
        qt(amx_path ? 0 : D * ld_max),
        st(kKeyBlock * ld_max),
        row_m(ld_max),
        row_l(ld_max),
        alpha(ld_max),
        row_lse(tq_max),
        acc_t(amx_path ? Kp * ld_max : 0),
        q_vnni(amx_path ? Kp * ld_max : 0),
        k_pad(amx_path ? kKeyBlock * Kp : 0),
        v_t(amx_path ? Kp * kKeyBlock : 0),
        p_vnni(amx_path ? kKeyBlock / 2 * ld_max : 0) {}
};

inline const uint16_t* bf16_rows(const Tensor& t) {
  return static_cast<const uint16_t*>(t.data_ptr());
}

// Rows [j0, j0 + n) of values [len, D] as fp32 rows of Dp columns: the rows themselves when they
// already are (fp32, unit stride, D == Dp), else a copy into buf (whose padding columns are 0).
// Returns (first row, row stride).
std::pair<const float*, int64_t> value_rows(const Tensor& src, int64_t j0, int64_t n, int64_t Dp,
                                            Tensor& buf) {
  const int64_t D = src.size(1);
  Tensor rows = src.narrow(0, j0, n);
  if (D == Dp && rows.scalar_type() == at::kFloat && (D <= 1 || rows.stride(1) == 1))
    return {rows.data_ptr<float>(), rows.stride(0)};
  buf.narrow(0, 0, n * Dp).view({n, Dp}).narrow(1, 0, D).copy_(rows);
  return {buf.data_ptr<float>(), Dp};
}

// One block of the online softmax, vectorised over the tile's rows: x is the key-major block of
// unscaled logits [bk, ld] (rows r < tq; the lanes past tq are padding rows, never read back).
// Per row: m_new = max(m, max_j x_j * scale) (NaN sticks); p_j = exp(x_j * scale - m_sub) written
// over x, where m_sub = m_new, or 0 while the maximum is not finite (no key above -inf yet: every
// p is then 0; a NaN or +inf maximum: the row is undefined and its output replaced at the end);
// alpha = exp(m - m_sub) rescales what the row summed so far; l = l * alpha + sum_j p_j. The
// arguments of exp are <= 0 or -inf wherever the result is used, so exp_u20's clamping of NaN
// and overflow never shows.
void softmax_block(float* x, int64_t bk, int64_t tq, int64_t ld, float scale, float* row_m,
                   float* row_l, float* alpha) {
  const Vec vs(scale), zero(0.0f);
  for (int64_t r = 0; r < tq; r += Vec::size()) {
    Vec bm(kNegInf);
    for (int64_t j = 0; j < bk; ++j) {
      const Vec s = Vec::loadu(x + j * ld + r) * vs;
      s.store(x + j * ld + r);
      bm = at::vec::maximum(bm, s);
    }
    const Vec m_old = Vec::loadu(row_m + r);
    const Vec m_new = at::vec::maximum(m_old, bm);
    const Vec m_sub = Vec::blendv(m_new, zero, (m_new - m_new) != zero);  // not finite: 0
    Vec sum(0.0f);
    for (int64_t j = 0; j < bk; ++j) {
      const Vec p = (Vec::loadu(x + j * ld + r) - m_sub).exp_u20();
      p.store(x + j * ld + r);
      sum = sum + p;
    }
    const Vec a = (m_old - m_sub).exp_u20();
    (Vec::loadu(row_l + r) * a + sum).store(row_l + r);
    m_new.store(row_m + r);
    a.store(alpha + r);
  }
}

#ifdef MASKKV_HAVE_AMX
// The AMX products of one key block (bk keys k [bk, D], values v [bk, D], bf16, row strides
// k_stride / v_stride) against the packed rows sc.q_vnni: logits into sc.st, the online softmax,
// then acc_t [Kp, ld] (transposed: column c of the output in row c, rows in lanes) += V^T . P
// with P in bf16, as flash attention does.
void amx_block(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
               int64_t bk, int64_t tq, int64_t D, int64_t ld, float scale, Scratch& sc) {
  const int64_t Kp = sc.Kp, bkp = (bk + 31) / 32 * 32;
  float* st = sc.st.data();
  int64_t a_stride;
  const uint16_t* a = amx::padded_rows(k, k_stride, bk, D, sc.k_pad.data(), a_stride);
  amx::matmul(a, a_stride, (bk + 15) / 16 * 16, sc.q_vnni.data(), ld, Kp, st, ld, false);
  softmax_block(st, bk, tq, ld, scale, sc.row_m.data(), sc.row_l.data(), sc.alpha.data());
  float* acc_t = sc.acc_t.data();
  for (int64_t c = 0; c < Kp; ++c)  // x * 1 is x: rescaling every row is exact where alpha is 1
    for (int64_t r = 0; r < ld; r += Vec::size())
      (Vec::loadu(acc_t + c * ld + r) * Vec::loadu(sc.alpha.data() + r)).store(acc_t + c * ld + r);
  amx::pack_vnni_probs(st, bk, ld, sc.p_vnni.data());
  amx::transpose_values(v, v_stride, bk, D, sc.v_t.data());
  amx::matmul(sc.v_t.data(), bkp, Kp, reinterpret_cast<const uint16_t*>(sc.p_vnni.data()), ld,
              bkp, acc_t, ld, true);
}
#endif

// The tq query rows q [tq, D] (row stride q_stride, unit stride along D; fp32, or bf16 on the
// AMX path, sc.amx) attend to the keys of `n_src` sources, in order (each [n, D] with unit stride
// along D): one online softmax. Returns the output, a view of sc.acc [tq, Dp] (columns past D
// are padding), and writes each row's natural-log LSE to lse[i] when lse is not null.
Tensor attend_rows(const void* q, int64_t q_stride, int64_t tq, int64_t D, const Tensor* keys,
                   const Tensor* vals, int64_t n_src, float scale, Scratch& sc, float* lse) {
  const int64_t Dp = sc.Dp, ld = round_to_vec(tq);
  float* acc = sc.acc.data_ptr<float>();
  std::fill(acc, acc + tq * Dp, 0.0f);
  std::fill(sc.row_m.begin(), sc.row_m.begin() + ld, kNegInf);
  std::fill(sc.row_l.begin(), sc.row_l.begin() + ld, 0.0f);
#ifdef MASKKV_HAVE_AMX
  if (sc.amx) {
    amx::pack_vnni_rows(static_cast<const uint16_t*>(q), q_stride, tq, D, ld, sc.q_vnni.data());
    std::fill(sc.acc_t.begin(), sc.acc_t.begin() + sc.Kp * ld, 0.0f);
  }
#endif
  if (!sc.amx) pack_rows(static_cast<const float*>(q), q_stride, tq, D, ld, sc.qt.data());
  int64_t n_keys = 0;
  for (int64_t src = 0; src < n_src; ++src) {
    const int64_t len = keys[src].size(0);
    n_keys += len;
    for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
      const int64_t bk = std::min(kKeyBlock, len - j0);
#ifdef MASKKV_HAVE_AMX
      if (sc.amx) {
        amx_block(bf16_rows(keys[src]) + j0 * keys[src].stride(0), keys[src].stride(0),
                  bf16_rows(vals[src]) + j0 * vals[src].stride(0), vals[src].stride(0), bk, tq,
                  D, ld, scale, sc);
        continue;
      }
#endif
      const Tensor kf = rows_as_float(keys[src], j0, bk, sc.kbuf);
      float* st = sc.st.data();
      key_major_logits(kf.data_ptr<float>(), kf.stride(0), bk, sc.qt.data(), D, ld, st);
      softmax_block(st, bk, tq, ld, scale, sc.row_m.data(), sc.row_l.data(), sc.alpha.data());
      for (int64_t i = 0; i < tq; ++i)
        if (sc.alpha[i] != 1.0f) scale_inplace(acc + i * Dp, Dp, sc.alpha[i]);
      const auto vf = value_rows(vals[src], j0, bk, Dp, sc.vbuf);
      accumulate_pv(st, ld, bk, tq, vf.first, vf.second, Dp, acc, Dp);
    }
  }
#ifdef MASKKV_HAVE_AMX
  if (sc.amx) amx::untranspose_acc(sc.acc_t.data(), ld, tq, Dp, acc);  // [Kp, ld] to rows
#endif
  for (int64_t i = 0; i < tq; ++i) {
    const float m = sc.row_m[i], l = sc.row_l[i];
    float* a = acc + i * Dp;
    float row_lse;
    if (n_keys == 0) {  // no key at all: 0, LSE -inf
      std::fill(a, a + Dp, 0.0f);
      row_lse = kNegInf;
    } else if (std::isfinite(m)) {  // then l >= 1: the maximum's own term is exp(0)
      scale_inplace(a, Dp, 1.0f / l);
      row_lse = m + std::log(l);
    } else {  // NaN or +inf logit, or every logit -inf: undefined softmax, LSE as the maximum
      std::fill(a, a + Dp, std::numeric_limits<float>::quiet_NaN());
      row_lse = m;
    }
    if (lse) lse[i] = row_lse;
  }
  return sc.acc.narrow(0, 0, tq);
}

// cu int32 [n + 1] on the CPU: 0 first, non-decreasing, last == limit (exact) or <= limit (else;
// no bound when limit < 0).
const int32_t* check_offsets(const Tensor& cu, const char* name, int64_t n, int64_t limit,
                             const char* limit_name, bool exact) {
  check_int32(cu, name, {n + 1});
  const int32_t* p = cu.data_ptr<int32_t>();
  if (exact)
    TORCH_CHECK(p[0] == 0 && p[n] == limit, name, ": expected to start at 0 and end at ",
                limit_name, "=", limit, ", got ", p[0], " ... ", p[n]);
  TORCH_CHECK(p[0] == 0, name, ": expected to start at 0, got ", p[0]);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], name, ": expected non-decreasing values, got ", p[i], " > ",
                p[i + 1], " at ", i);
  TORCH_CHECK(limit < 0 || p[n] <= limit, name, ": expected to end at most at ", limit_name, "=",
              limit, ", got ", p[n]);
  return p;
}

// starts int64 [n] on the CPU (optional): every [starts[i], starts[i] + len(i)) inside [0, rows).
// Returns null when absent.
const int64_t* check_starts(const c10::optional<Tensor>& starts, const char* name, int64_t n,
                            const int32_t* cu, int64_t rows) {
  if (!starts.has_value() || !starts->defined()) return nullptr;
  check_cpu(*starts, name);
  TORCH_CHECK(starts->scalar_type() == at::kLong && starts->sizes() == at::IntArrayRef({n}) &&
                  starts->is_contiguous(),
              name, ": expected a contiguous int64 tensor [", n, "], got ", starts->sizes(), " ",
              starts->scalar_type());
  const int64_t* p = starts->data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] + (cu[i + 1] - cu[i]) <= rows, name,
                ": expected rows inside [0, ", rows, "), got [", p[i], ", ",
                p[i] + (cu[i + 1] - cu[i]), ") at ", i);
  return p;
}

// The cache: k / v [N, D] of q's dtype (unit stride along D), S segments of cu_seqlens, packed
// (filling k exactly) or at seg_starts (anywhere inside k). Returns the offsets and the starts
// (null when packed), every row range checked.
std::pair<const int32_t*, const int64_t*> check_cache(const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& cu_seqlens,
                                                      const c10::optional<Tensor>& seg_starts,
                                                      int64_t S, int64_t D) {
  check_float(k, "k");
  check_dim(k, 2, "k", "[N, D]");
  TORCH_CHECK(k.size(1) == D && k.scalar_type() == q.scalar_type(), "k: expected [N, D=", D,
              "] of dtype ", q.scalar_type(), ", got ", k.sizes(), " ", k.scalar_type());
  check_float(v, "v");
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "v: expected k's shape ", k.sizes(), " and dtype, got ", v.sizes(), " ",
              v.scalar_type());
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  const int64_t N = k.size(0);
  const bool pool = seg_starts.has_value() && seg_starts->defined();
  const int32_t* cu = check_offsets(cu_seqlens, "cu_seqlens", S, pool ? -1 : N, "N", !pool);
  return {cu, check_starts(seg_starts, "seg_starts", S, cu, N)};
}
}  // namespace

std::tuple<Tensor, Tensor> ragged_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& cu_seqlens, int64_t num_kv_heads,
                                            const c10::optional<Tensor>& k_tail,
                                            const c10::optional<Tensor>& v_tail, double scale_d,
                                            bool return_lse,
                                            const c10::optional<Tensor>& seg_starts) {
  check_float(q, "q");
  check_dim(q, 4, "q", "[B, Hq, Lq, D]");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = num_kv_heads;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "num_kv_heads: expected a positive divisor of Hq=", Hq,
              ", got ", Hkv);
  const int64_t S = B * Hkv;
  // (No structured binding: C++17 lambdas, the parallel_for below, cannot capture one.)
  const auto segments = check_cache(q, k, v, cu_seqlens, seg_starts, S, D);
  const int32_t* cu = segments.first;
  const int64_t* starts = segments.second;
  const bool has_kt = k_tail.has_value() && k_tail->defined();
  const bool has_vt = v_tail.has_value() && v_tail->defined();
  TORCH_CHECK(has_kt == has_vt, "k_tail, v_tail: expected both or neither");
  if (has_kt) {
    check_float(*k_tail, "k_tail");
    check_dim(*k_tail, 4, "k_tail", "[B, Hkv, Lt, D]");
    TORCH_CHECK(k_tail->size(0) == B && k_tail->size(1) == Hkv && k_tail->size(3) == D &&
                    k_tail->scalar_type() == q.scalar_type(),
                "k_tail: expected [B=", B, ", Hkv=", Hkv, ", Lt, D=", D, "] of dtype ",
                q.scalar_type(), ", got ", k_tail->sizes(), " ", k_tail->scalar_type());
    TORCH_CHECK(v_tail->sizes() == k_tail->sizes() && v_tail->scalar_type() == q.scalar_type(),
                "v_tail: expected k_tail's shape ", k_tail->sizes(), ", got ", v_tail->sizes());
    check_last_dim_contiguous(*k_tail, "k_tail");
    check_last_dim_contiguous(*v_tail, "v_tail");
  }
  const int64_t G = Hq / Hkv, rows_per_seg = G * Lq;
  Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  Tensor lse = return_lse ? at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat))
                          : at::empty({0}, q.options().dtype(at::kFloat));
  if (S == 0 || rows_per_seg == 0 || D == 0) {
    if (D == 0 && return_lse) lse.fill_(kNegInf);
    return {out, lse};
  }
  const float scale = static_cast<float>(scale_d);
  float* lse_p = return_lse ? lse.data_ptr<float>() : nullptr;
  Tensor out_rows = out.view({S, rows_per_seg, D});  // segment s owns rows of heads g*G..g*G+G-1

  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(std::min(rows_per_seg, kRowTile), D, q.options(), use_amx(q));
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, g = s % Hkv;
      const Tensor rows = q[b].narrow(0, g * G, G).reshape({rows_per_seg, D});
      // Key sources in softmax order: the kept segment, then the tail.
      const int64_t first = starts ? starts[s] : cu[s], len = cu[s + 1] - cu[s];
      const Tensor keys[2] = {k.narrow(0, first, len), has_kt ? (*k_tail)[b][g] : Tensor()};
      const Tensor vals[2] = {v.narrow(0, first, len), has_kt ? (*v_tail)[b][g] : Tensor()};
      for (int64_t r0 = 0; r0 < rows_per_seg; r0 += kRowTile) {
        const int64_t tq = std::min(kRowTile, rows_per_seg - r0);
        Tensor qf = rows.narrow(0, r0, tq);  // the AMX path reads the input rows
        if (!sc.amx) qf = rows_as_float(rows, r0, tq, sc.qbuf);
        else if (D > 1 && qf.stride(1) != 1) qf = qf.contiguous();
        // row r = h * Lq + t of head g * G + h: lse index (b * Hq + g * G) * Lq + r
        float* lse_rows = lse_p ? lse_p + (b * Hq + g * G) * Lq + r0 : nullptr;
        const Tensor acc = attend_rows(qf.data_ptr(), qf.stride(0), tq, D, keys, vals,
                                       has_kt ? 2 : 1, scale, sc, lse_rows);
        out_rows[s].narrow(0, r0, tq).copy_(acc.narrow(1, 0, D));
      }
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> ragged_attention_varlen(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
    const c10::optional<Tensor>& seg_starts, int64_t num_kv_heads, const Tensor& cu_seqlens_q,
    const c10::optional<Tensor>& k_tail, const c10::optional<Tensor>& v_tail,
    const c10::optional<Tensor>& cu_seqlens_tail, const c10::optional<Tensor>& tail_starts,
    double scale_d, bool return_lse) {
  check_float(q, "q");
  check_dim(q, 3, "q", "[Nq, Hq, D]");
  const int64_t Nq = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = num_kv_heads;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "num_kv_heads: expected a positive divisor of Hq=", Hq,
              ", got ", Hkv);
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.numel() >= 2,
              "cu_seqlens_q: expected an int32 tensor [B + 1], got shape ", cu_seqlens_q.sizes());
  const int64_t B = cu_seqlens_q.numel() - 1, S = B * Hkv;
  const int32_t* cu_q = check_offsets(cu_seqlens_q, "cu_seqlens_q", B, Nq, "Nq", false);
  // (No structured binding: C++17 lambdas, the parallel_for below, cannot capture one.)
  const auto segments = check_cache(q, k, v, cu_seqlens, seg_starts, S, D);
  const int32_t* cu = segments.first;
  const int64_t* starts = segments.second;
  const bool has_kt = k_tail.has_value() && k_tail->defined();
  const bool has_vt = v_tail.has_value() && v_tail->defined();
  TORCH_CHECK(has_kt == has_vt, "k_tail, v_tail: expected both or neither");
  const int32_t* cu_t = nullptr;
  const int64_t* t_starts = nullptr;
  if (has_kt) {
    check_float(*k_tail, "k_tail");
    check_dim(*k_tail, 3, "k_tail", "[Nt, Hkv, D]");
    TORCH_CHECK(k_tail->size(1) == Hkv && k_tail->size(2) == D &&
                    k_tail->scalar_type() == q.scalar_type(),
                "k_tail: expected [Nt, Hkv=", Hkv, ", D=", D, "] of dtype ", q.scalar_type(),
                ", got ", k_tail->sizes(), " ", k_tail->scalar_type());
    TORCH_CHECK(v_tail->sizes() == k_tail->sizes() && v_tail->scalar_type() == q.scalar_type(),
                "v_tail: expected k_tail's shape ", k_tail->sizes(), ", got ", v_tail->sizes());
    check_last_dim_contiguous(*k_tail, "k_tail");
    check_last_dim_contiguous(*v_tail, "v_tail");
    TORCH_CHECK(cu_seqlens_tail.has_value() && cu_seqlens_tail->defined(),
                "cu_seqlens_tail: expected an int32 tensor [B + 1] with k_tail");
    const int64_t Nt = k_tail->size(0);
    const bool placed = tail_starts.has_value() && tail_starts->defined();
    cu_t = check_offsets(*cu_seqlens_tail, "cu_seqlens_tail", B, placed ? -1 : Nt, "Nt", false);
    t_starts = check_starts(tail_starts, "tail_starts", B, cu_t, Nt);
  }
  const int64_t G = Hq / Hkv;
  Tensor out = at::zeros({Nq, Hq, D}, q.options());  // rows of no request stay 0
  Tensor lse = return_lse ? at::full({Nq, Hq}, kNegInf, q.options().dtype(at::kFloat))
                          : at::empty({0}, q.options().dtype(at::kFloat));
  if (S == 0 || Nq == 0 || D == 0) return {out, lse};
  const float scale = static_cast<float>(scale_d);
  float* lse_p = return_lse ? lse.data_ptr<float>() : nullptr;
  // Whole queries per tile: ti queries x G heads = ti * G packed rows (at least one query).
  const int64_t ti_max = std::max<int64_t>(1, kRowTile / G);

  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(ti_max * G, D, q.options(), use_amx(q));
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, g = s % Hkv;
      const int64_t q0 = cu_q[b], nq = cu_q[b + 1] - cu_q[b];
      if (nq == 0) continue;
      const int64_t first = starts ? starts[s] : cu[s], len = cu[s + 1] - cu[s];
      Tensor keys[2] = {k.narrow(0, first, len), Tensor()};
      Tensor vals[2] = {v.narrow(0, first, len), Tensor()};
      if (has_kt) {
        const int64_t t0 = t_starts ? t_starts[b] : cu_t[b], lt = cu_t[b + 1] - cu_t[b];
        keys[1] = k_tail->narrow(0, t0, lt).select(1, g);  // [lt, D], row stride Hkv * D
        vals[1] = v_tail->narrow(0, t0, lt).select(1, g);
      }
      const Tensor q_heads = q.narrow(0, q0, nq).narrow(1, g * G, G);    // [nq, G, D]
      const Tensor o_heads = out.narrow(0, q0, nq).narrow(1, g * G, G);  // [nq, G, D]
      for (int64_t i0 = 0; i0 < nq; i0 += ti_max) {
        const int64_t ti = std::min(ti_max, nq - i0), tq = ti * G;
        // Packed row r = i * G + h: the G heads of one query are adjacent (query-major).
        Tensor qf = sc.qbuf.narrow(0, 0, tq * D).view({ti, G, D});
        qf.copy_(q_heads.narrow(0, i0, ti));
        float* lse_rows = lse_p ? lse_p + (q0 + i0) * Hq + g * G : nullptr;
        const Tensor acc = attend_rows(qf.data_ptr(), D, tq, D, keys, vals, has_kt ? 2 : 1,
                                       scale, sc, lse_rows ? sc.row_lse.data() : nullptr);
        o_heads.narrow(0, i0, ti).copy_(acc.view({ti, G, sc.Dp}).narrow(2, 0, D));
        if (lse_rows) {  // row i * G + h -> lse[(q0 + i0 + i) * Hq + g * G + h]
          for (int64_t i = 0; i < ti; ++i)
            for (int64_t h = 0; h < G; ++h) lse_rows[i * Hq + h] = sc.row_lse[i * G + h];
        }
      }
    }
  });
  return {out, lse};
}

}  // namespace maskkv_cpu
