// Python bindings of mmfast._C. Each op's kernels live in csrc/<op>.cpp; a binding is named
// <stem>_<method>, after the op ("contrastive", "distillation", "pooling": the op's name without
// "_loss") and the method of the kernel set it serves (mmfast/backends/<op>.py, Cpu<Stem>Kernels),
// and the C++ function carries the same name.
#include <torch/extension.h>

namespace mmfast {
void contrastive_softmax_rows(at::Tensor scores, int64_t row_offset, double inv_temperature, double hardness,
                              c10::optional<double> margin, c10::optional<at::Tensor> row_scale, at::Tensor loss,
                              c10::optional<at::Tensor> temperature_grad, c10::optional<at::Tensor> ids,
                              c10::optional<at::Tensor> column_diag, c10::optional<at::Tensor> column_lse,
                              c10::optional<at::Tensor> column_coef, c10::optional<at::Tensor> column_positive,
                              c10::optional<at::Tensor> column_ids);
void contrastive_column_stats(at::Tensor block, int64_t row_offset, double inv_temperature, double hardness,
                              c10::optional<double> margin, at::Tensor diag, c10::optional<at::Tensor> ids,
                              at::Tensor running_max, at::Tensor running_sum, c10::optional<at::Tensor> weighted);
void contrastive_column_topk(at::Tensor block, int64_t row_offset, c10::optional<double> margin, at::Tensor diag,
                             c10::optional<at::Tensor> ids, at::Tensor values, at::Tensor index);
void contrastive_topk_rows(at::Tensor scores, int64_t row_offset, double inv_temperature, double hardness,
                           c10::optional<double> margin, int64_t topk, c10::optional<at::Tensor> row_scale,
                           at::Tensor loss, at::Tensor index, c10::optional<at::Tensor> coef,
                           c10::optional<at::Tensor> temperature_grad, c10::optional<at::Tensor> ids);
void contrastive_matryoshka_rows(at::Tensor blocks, int64_t row_offset, double inv_temperature, double hardness,
                                 c10::optional<double> margin, at::Tensor inv_row_norms, at::Tensor inv_col_norms,
                                 c10::optional<at::Tensor> row_scale, at::Tensor loss, c10::optional<at::Tensor> alpha,
                                 c10::optional<at::Tensor> beta, c10::optional<at::Tensor> ids);
void contrastive_sparse_grads(at::Tensor x, at::Tensor targets, c10::optional<at::Tensor> negatives, at::Tensor index,
                              at::Tensor coef, c10::optional<at::Tensor> grad_x, c10::optional<at::Tensor> grad_targets,
                              c10::optional<at::Tensor> grad_negatives);
void distillation_kl_rows(at::Tensor student, at::Tensor teacher, double inv_student_t, double inv_teacher_t,
                          c10::optional<at::Tensor> row_scale, at::Tensor loss,
                          c10::optional<at::Tensor> temperature_grad);
void pooling_forward(at::Tensor hidden, at::Tensor mask, int64_t mode, bool normalize, at::Tensor out,
                     at::Tensor unit, at::Tensor norm, at::Tensor index, at::Tensor count);
void pooling_backward(at::Tensor grad_out, at::Tensor unit, at::Tensor norm, at::Tensor index, at::Tensor count,
                      at::Tensor mask, int64_t mode, bool normalize, at::Tensor grad_hidden);
void similarity_topk_rows(at::Tensor scores, int64_t col_offset, at::Tensor values, at::Tensor indices,
                          c10::optional<at::Tensor> targets, c10::optional<at::Tensor> target_score,
                          c10::optional<at::Tensor> count, bool last);
void similarity_topk_search(at::Tensor query, at::Tensor gallery, int64_t col_offset, at::Tensor values,
                            at::Tensor indices, c10::optional<at::Tensor> targets,
                            c10::optional<at::Tensor> target_score, c10::optional<at::Tensor> count, bool last);
void similarity_topk_search_screened(at::Tensor query, at::Tensor query_bf16, at::Tensor query_norms,
                                     at::Tensor gallery, at::Tensor gallery_bf16, at::Tensor gallery_norms,
                                     int64_t col_offset, at::Tensor values, at::Tensor indices, bool last);
void similarity_topk_screen_rows(at::Tensor x, at::Tensor copy, at::Tensor norms);
void sigmoid_pair_rows(at::Tensor scores, int64_t row_offset, double scale, double bias,
                       c10::optional<at::Tensor> row_scale, at::Tensor loss, c10::optional<at::Tensor> scale_grad,
                       c10::optional<at::Tensor> bias_grad, c10::optional<at::Tensor> ids);
void late_interaction_maxsim(at::Tensor tile, at::Tensor bias, at::Tensor query_mask, at::Tensor scores,
                             at::Tensor argmax);
void late_interaction_scores(at::Tensor query, at::Tensor query_mask, at::Tensor documents, at::Tensor bias,
                             int64_t doc_tokens, at::Tensor scores, at::Tensor argmax);
void late_interaction_grads(at::Tensor grad_scores, at::Tensor query, at::Tensor query_mask, at::Tensor documents,
                            at::Tensor argmax, int64_t doc_tokens, c10::optional<at::Tensor> grad_query,
                            c10::optional<at::Tensor> grad_documents);
void late_interaction_topk_maxsim(at::Tensor tile, at::Tensor bias, at::Tensor query_mask,
                                  c10::optional<at::Tensor> divisor, at::Tensor scores);
}  // namespace mmfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast CPU kernels";
  m.def("contrastive_softmax_rows", &mmfast::contrastive_softmax_rows,
        "Fused masked/hardness-weighted row logsumexp and in-place gradient over one score chunk (and, for a "
        "symmetric loss, the column gradient on its B x B block)",
        py::arg("scores"), py::arg("row_offset"), py::arg("inv_temperature"), py::arg("hardness"), py::arg("margin"),
        py::arg("row_scale"), py::arg("loss"), py::arg("temperature_grad"), py::arg("ids"),
        py::arg("column_diag") = py::none(), py::arg("column_lse") = py::none(), py::arg("column_coef") = py::none(),
        py::arg("column_positive") = py::none(), py::arg("column_ids") = py::none());
  m.def("contrastive_column_stats", &mmfast::contrastive_column_stats,
        "Merge one chunk's B x B block into the symmetric loss's running column max and sum of exp");
  m.def("contrastive_column_topk", &mmfast::contrastive_column_topk,
        "Merge one chunk's B x B block into the symmetric loss's running top-k per column");
  m.def("contrastive_topk_rows", &mmfast::contrastive_topk_rows,
        "Top-k hard-negative selection, loss and sparse gradient coefficients over one score chunk");
  m.def("contrastive_matryoshka_rows", &mmfast::contrastive_matryoshka_rows,
        "Matryoshka over one chunk's segment products: every prefix's normalised scores, the row kernel, and the "
        "gradient folded into one block per segment",
        py::arg("blocks"), py::arg("row_offset"), py::arg("inv_temperature"), py::arg("hardness"), py::arg("margin"),
        py::arg("inv_row_norms"), py::arg("inv_col_norms"), py::arg("row_scale"), py::arg("loss"), py::arg("alpha"),
        py::arg("beta"), py::arg("ids"));
  m.def("contrastive_sparse_grads", &mmfast::contrastive_sparse_grads,
        "Accumulate the sparse top-k gradients into grad_x and the candidate gradients");
  m.def("distillation_kl_rows", &mmfast::distillation_kl_rows,
        "Fused teacher/student logsumexps, KL(p_t || p_s) and the student's in-place gradient over one chunk");
  m.def("pooling_forward", &mmfast::pooling_forward, "Fused last-token / mean pooling with L2 normalisation");
  m.def("pooling_backward", &mmfast::pooling_backward, "Dense gradient of the fused pooling, in one pass");
  m.def("similarity_topk_rows", &mmfast::similarity_topk_rows,
        "Merge one score tile into each row's running top-k and count the scores above its target");
  m.def("similarity_topk_search", &mmfast::similarity_topk_search,
        "Score one gallery chunk against every query in cache-sized blocks (one GEMM each) and merge each block "
        "into the rows' running top-k and target counts at once");
  m.def("similarity_topk_search_screened", &mmfast::similarity_topk_search_screened,
        "similarity_topk_search on bf16 copies (twice the GEMM rate), every kept score an exact float32 one: an "
        "item is scored in float32 only when its bf16 score, within its error bound, could enter the row's top-k");
  m.def("similarity_topk_screen_rows", &mmfast::similarity_topk_screen_rows,
        "Rows as bf16 (round to nearest even) with their norms ||x||, ||x - bf16(x)||, ||bf16(x)|| in float64: the "
        "screened search's inputs");
  m.def("sigmoid_pair_rows", &mmfast::sigmoid_pair_rows,
        "Fused SigLIP pairwise sigmoid loss and in-place gradient over one score chunk", py::arg("scores"),
        py::arg("row_offset"), py::arg("scale"), py::arg("bias"), py::arg("row_scale"), py::arg("loss"),
        py::arg("scale_grad"), py::arg("bias_grad"), py::arg("ids"));
  m.def("late_interaction_maxsim", &mmfast::late_interaction_maxsim,
        "MaxSim of one token-score tile: max and first arg-max per (query token, document), summed per query");
  m.def("late_interaction_scores", &mmfast::late_interaction_scores,
        "MaxSim of every query against a chunk of documents: per-thread GEMM blocks reduced in cache to the max "
        "and first arg-max per (query token, document), summed per query");
  m.def("late_interaction_grads", &mmfast::late_interaction_grads,
        "Backward of the MaxSim scores through the stored arg-max: query and document token gradients");
  m.def("late_interaction_topk_maxsim", &mmfast::late_interaction_topk_maxsim,
        "MaxSim scores of one token-score tile (no arg-max), optionally divided by each query's length");
}
