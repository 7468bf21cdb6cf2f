// Ragged attention on the CPU: per (batch row b, KV head g), the G*Lq query rows of the KV
// head's G query heads (GQA packing, K/V never repeated) attend to [kept segment || dense tail]
// with one online softmax, flash style: tiles of kRowTile rows x kKeyBlock keys, the segment's
// keys first, then the tail's, never concatenated. fp32 accumulation whatever the input dtype.
#include "maskkv_cpu.h"

namespace maskkv_cpu {

namespace {
constexpr int64_t kRowTile = 256;
constexpr int64_t kKeyBlock = 512;
}  // namespace

std::tuple<Tensor, Tensor> ragged_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& cu_seqlens, int64_t num_kv_heads,
                                            const c10::optional<Tensor>& k_tail,
                                            const c10::optional<Tensor>& v_tail, double scale_d,
                                            bool return_lse) {
  check_float(q, "q");
  check_dim(q, 4, "q", "[B, Hq, Lq, D]");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = num_kv_heads;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "num_kv_heads: expected a positive divisor of Hq=", Hq,
              ", got ", Hkv);
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
  const int64_t S = B * Hkv, N = k.size(0);
  check_int32(cu_seqlens, "cu_seqlens", {S + 1});
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[S] == N, "cu_seqlens: expected to start at 0 and end at N=", N);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(cu[s] <= cu[s + 1], "cu_seqlens: expected non-decreasing values, got ", cu[s],
                " > ", cu[s + 1], " at ", s);
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
    const auto f32 = q.options().dtype(at::kFloat);
    const int64_t tq_max = std::min(rows_per_seg, kRowTile);
    Tensor qbuf = at::empty({tq_max * D}, f32);
    Tensor kbuf = at::empty({kKeyBlock * D}, f32);
    Tensor vbuf = at::empty({kKeyBlock * D}, f32);
    Tensor sbuf = at::empty({tq_max * kKeyBlock}, f32);
    Tensor acc_buf = at::empty({tq_max, D}, f32);
    std::vector<float> row_m(tq_max), row_l(tq_max);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / Hkv, g = s % Hkv;
      const Tensor rows = q[b].narrow(0, g * G, G).reshape({rows_per_seg, D});
      // Key sources in softmax order: the kept segment, then the tail.
      const Tensor sources_k[2] = {k.narrow(0, cu[s], cu[s + 1] - cu[s]),
                                   has_kt ? (*k_tail)[b][g] : Tensor()};
      const Tensor sources_v[2] = {v.narrow(0, cu[s], cu[s + 1] - cu[s]),
                                   has_kt ? (*v_tail)[b][g] : Tensor()};
      const int64_t n_src = has_kt ? 2 : 1;
      for (int64_t r0 = 0; r0 < rows_per_seg; r0 += kRowTile) {
        const int64_t tq = std::min(kRowTile, rows_per_seg - r0);
        const Tensor qf = rows_as_float(rows, r0, tq, qbuf);
        Tensor acc = acc_buf.narrow(0, 0, tq);
        acc.zero_();
        float* acc_p = acc.data_ptr<float>();
        std::fill(row_m.begin(), row_m.end(), kNegInf);
        std::fill(row_l.begin(), row_l.end(), 0.0f);
        for (int64_t src = 0; src < n_src; ++src) {
          const Tensor& ks = sources_k[src];
          const int64_t len = ks.size(0);
          for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
            const int64_t bk = std::min(kKeyBlock, len - j0);
            const Tensor kf = rows_as_float(ks, j0, bk, kbuf);
            const Tensor vf = rows_as_float(sources_v[src], j0, bk, vbuf);
            Tensor st = sbuf.narrow(0, 0, tq * bk).view({tq, bk});
            at::mm_out(st, qf, kf.t());
            float* sp = st.data_ptr<float>();
            for (int64_t i = 0; i < tq; ++i) {
              float* x = sp + i * bk;
              const float bm = scale_and_max(x, bk, scale);
              const float m_new = std::max(row_m[i], bm);
              if (m_new == kNegInf) {  // no finite logit yet: contributes nothing
                std::fill(x, x + bk, 0.0f);
                continue;
              }
              const float alpha = std::exp(row_m[i] - m_new);
              row_l[i] = row_l[i] * alpha + exp_sub_sum(x, bk, m_new);
              row_m[i] = m_new;
              if (alpha != 1.0f) scale_inplace(acc_p + i * D, D, alpha);
            }
            acc.addmm_(st, vf);  // acc += P . V
          }
        }
        // Normalise into the output dtype; a row with no key at all is 0 (lse -inf).
        for (int64_t i = 0; i < tq; ++i) {
          const float l = row_l[i];
          scale_inplace(acc_p + i * D, D, l > 0.0f ? 1.0f / l : 0.0f);
          if (lse_p) {
            const int64_t r = r0 + i;  // row r = h * Lq + t of head g * G + h
            lse_p[(b * Hq + g * G) * Lq + r] = l > 0.0f ? row_m[i] + std::log(l) : kNegInf;
          }
        }
        out_rows[s].narrow(0, r0, tq).copy_(acc);
      }
    }
  });
  return {out, lse};
}

}  // namespace maskkv_cpu
