// Registers the C++ CPU kernels as the `maskkv_cpp` operator library (CPU dispatch key only).
//
// These ops are called from the CPU path of the Python custom ops `maskkv::*`
// (maskkv_kernels/select/op.py, maskkv_kernels/attention/op.py) when backend="cpp". Those custom
// ops carry the fake (meta) implementations, so torch.compile traces through them unchanged and
// never needs to look inside these.
#include <torch/library.h>

#include "maskkv_cpu.h"

namespace maskkv_cpu {

std::tuple<Tensor, Tensor> score_keys(const Tensor& q, const Tensor& k, const Tensor& first,
                                      const c10::optional<Tensor>& lse, int64_t prompt_len,
                                      bool window, double scale, bool need_mass);
Tensor pool_window(const Tensor& raw, const Tensor& first, int64_t window, int64_t pool,
                   int64_t pool_kernel);
std::tuple<Tensor, Tensor, Tensor> topk_gather(const Tensor& scores, const Tensor& k,
                                               const Tensor& v, const Tensor& budgets,
                                               const Tensor& first, const Tensor& cu_seqlens,
                                               int64_t n);
std::tuple<Tensor, Tensor> ragged_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& cu_seqlens, int64_t num_kv_heads,
                                            const c10::optional<Tensor>& k_tail,
                                            const c10::optional<Tensor>& v_tail, double scale,
                                            bool return_lse,
                                            const c10::optional<Tensor>& seg_starts);
std::tuple<Tensor, Tensor> ragged_attention_varlen(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
    const c10::optional<Tensor>& seg_starts, int64_t num_kv_heads, const Tensor& cu_seqlens_q,
    const c10::optional<Tensor>& k_tail, const c10::optional<Tensor>& v_tail,
    const c10::optional<Tensor>& cu_seqlens_tail, const c10::optional<Tensor>& tail_starts,
    double scale, bool return_lse);

}  // namespace maskkv_cpu

TORCH_LIBRARY(maskkv_cpp, m) {
  m.def(
      "score_keys(Tensor q, Tensor k, Tensor first, Tensor? lse, int prompt_len, bool window, "
      "float scale, bool need_mass) -> (Tensor, Tensor)");
  m.def("pool_window(Tensor raw, Tensor first, int window, int pool, int pool_kernel) -> Tensor");
  m.def(
      "topk_gather(Tensor scores, Tensor k, Tensor v, Tensor budgets, Tensor first, "
      "Tensor cu_seqlens, int n) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ragged_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int num_kv_heads, "
      "Tensor? k_tail, Tensor? v_tail, float scale, bool return_lse, Tensor? seg_starts=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "ragged_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, "
      "Tensor? seg_starts, int num_kv_heads, Tensor cu_seqlens_q, Tensor? k_tail, "
      "Tensor? v_tail, Tensor? cu_seqlens_tail, Tensor? tail_starts, float scale, "
      "bool return_lse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(maskkv_cpp, CPU, m) {
  m.impl("score_keys", &maskkv_cpu::score_keys);
  m.impl("pool_window", &maskkv_cpu::pool_window);
  m.impl("topk_gather", &maskkv_cpu::topk_gather);
  m.impl("ragged_attention", &maskkv_cpu::ragged_attention);
  m.impl("ragged_attention_varlen", &maskkv_cpu::ragged_attention_varlen);
}
