// Routed LoRA sites on x86 CPUs with AVX-512: for each assignment p (row r, group g, sorted by
// group), s = A_g x[r] for n sites at once (their A side by side, n R wide), then each site's
// out[r, its columns] += coef[p, i] B_g,i s_i. One pass per assignment over its group's weights,
// which stay in L1/L2 across the group's consecutive assignments; no gathered rows, no [P, R]
// temporaries, no scatter. Semantics and shapes: kernels/lora/cpu.py; the torch reference is
// kernels/lora/reference.py (lora_apply_sites).
//
// Threads own row ranges (every assignment of a row is on one thread, in group order), so no
// two threads write one output row and a row's result does not depend on the batch.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

// Named, not anonymous: the sources are built as one translation unit (kernels/_cpu_build.py).
namespace mixserve_lora {

struct Site {
  const float* bt;  // [G, R, width]: B_g transposed, rows contiguous
  int64_t group_stride;
  int64_t rank_stride;
  int64_t width;
  int64_t column;  // first column in out
};

// The shrink for one row: kChunks x 8 accumulator lanes (n R = 8 kChunks), two interleaved
// accumulators to hide the FMA latency.
template <int kChunks>
void shrink(const float* x, const float* a, int64_t a_stride, int64_t in_features, float* s) {
  constexpr int kWidth = 8 * kChunks;
  __m256 acc[2][kChunks];
  for (auto& lane : acc)
    for (auto& v : lane) v = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 2 <= in_features; h += 2) {
    for (int u = 0; u < 2; ++u) {
      const __m256 xv = _mm256_set1_ps(x[h + u]);
      const float* row = a + (h + u) * a_stride;
      for (int c = 0; c < kChunks; ++c)
        acc[u][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row + 8 * c), acc[u][c]);
    }
  }
  for (; h < in_features; ++h) {
    const __m256 xv = _mm256_set1_ps(x[h]);
    for (int c = 0; c < kChunks; ++c)
      acc[0][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + h * a_stride + 8 * c), acc[0][c]);
  }
  for (int c = 0; c < kChunks; ++c) _mm256_storeu_ps(s + 8 * c, _mm256_add_ps(acc[0][c], acc[1][c]));
}

// out[0 .. width) += sum_r coef[r] bt[r, :], 16 columns at a time (masked tail).
void expand(const float* coef, const float* bt, int64_t rank_stride, int64_t rank, int64_t width,
            float* out) {
  for (int64_t o = 0; o < width; o += 16) {
    const int64_t left = width - o;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __m512 v = _mm512_maskz_loadu_ps(mask, out + o);
    for (int64_t r = 0; r < rank; ++r)
      v = _mm512_fmadd_ps(_mm512_set1_ps(coef[r]), _mm512_maskz_loadu_ps(mask, bt + r * rank_stride + o), v);
    _mm512_mask_storeu_ps(out + o, mask, v);
  }
}

template <int kChunks>
void run_rows(const float* x, int64_t x_stride, int64_t in_features, const float* a_joint,
              int64_t a_group_stride, int64_t a_in_stride, const std::vector<Site>& sites, int64_t rank, const int64_t* row_ids,
              const int64_t* group_ids, const float* coef, int64_t num_assignments, float* out,
              int64_t out_stride, int64_t begin, int64_t end) {
  constexpr int kWidth = 8 * kChunks;
  const int64_t num_sites = static_cast<int64_t>(sites.size());
  alignas(64) float s[kWidth];
  float scaled[64];
  for (int64_t p = 0; p < num_assignments; ++p) {
    const int64_t row = row_ids[p];
    if (row < begin || row >= end) continue;
    const int64_t g = group_ids[p];
    shrink<kChunks>(x + row * x_stride, a_joint + g * a_group_stride, a_in_stride, in_features, s);
    for (int64_t i = 0; i < num_sites; ++i) {
      const float c = coef[p * num_sites + i];
      if (c == 0.f) continue;
      for (int64_t r = 0; r < rank; ++r) scaled[r] = s[i * rank + r] * c;
      const Site& site = sites[i];
      expand(scaled, site.bt + g * site.group_stride, site.rank_stride, rank, site.width,
             out + row * out_stride + site.column);
    }
  }
}

}  // namespace mixserve_lora

// x [N, in] (rows may be strided, features contiguous); a_joint [G, in, n R] and bts n x
// [G, R, width_i], each with its last dimension contiguous; row_ids, group_ids [P] int64 (group-sorted); coef [P, n] float32
// contiguous; out [N, sum width_i] (rows may be strided, columns contiguous), updated in place.
void lora_sites(torch::Tensor x, torch::Tensor a_joint, std::vector<torch::Tensor> bts,
                torch::Tensor row_ids, torch::Tensor group_ids, torch::Tensor coef,
                torch::Tensor out) {
  using namespace mixserve_lora;
  const int64_t num_sites = static_cast<int64_t>(bts.size());
  const int64_t in_features = x.size(1), joint_width = a_joint.size(2);
  const int64_t rank = joint_width / num_sites;
  TORCH_CHECK(joint_width % 8 == 0 && joint_width <= 64 && rank <= 64,
              "lora_sites (cpu): n R = ", joint_width, " not a multiple of 8 up to 64");
  std::vector<Site> sites;
  int64_t column = 0;
  for (const auto& bt : bts) {
    sites.push_back({bt.data_ptr<float>(), bt.stride(0), bt.stride(1), bt.size(2), column});
    column += bt.size(2);
  }
  const int64_t num_assignments = row_ids.size(0);
  // Indices are checked here, outside the parallel region: a bad one is an error, not a write
  // out of bounds.
  const int64_t num_rows = std::min(x.size(0), out.size(0)), num_groups = a_joint.size(0);
  for (int64_t p = 0; p < num_assignments; ++p) {
    const int64_t row = row_ids.data_ptr<int64_t>()[p], group = group_ids.data_ptr<int64_t>()[p];
    TORCH_CHECK(row >= 0 && row < num_rows && group >= 0 && group < num_groups,
                "lora_sites (cpu): assignment ", p, " (row ", row, ", group ", group,
                ") is past ", num_rows, " rows or ", num_groups, " groups");
  }
  const float* xp = x.data_ptr<float>();
  const float* ap = a_joint.data_ptr<float>();
  const int64_t* rows = row_ids.data_ptr<int64_t>();
  const int64_t* groups = group_ids.data_ptr<int64_t>();
  const float* cp = coef.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  parallel_rows(num_rows, [&](int64_t begin, int64_t end) {
#define RUN(C)                                                                                \
  run_rows<C>(xp, x_stride, in_features, ap, a_joint.stride(0), a_joint.stride(1), sites, rank, rows, groups, cp, num_assignments, \
              op, out_stride, begin, end)
    switch (joint_width / 8) {
      case 1: RUN(1); break;
      case 2: RUN(2); break;
      case 3: RUN(3); break;
      case 4: RUN(4); break;
      case 5: RUN(5); break;
      case 6: RUN(6); break;
      case 7: RUN(7); break;
      case 8: RUN(8); break;
    }
#undef RUN
  });
}

#else  // no AVX-512 at build time: the Python wrapper falls back to the torch reference

void lora_sites(torch::Tensor, torch::Tensor, std::vector<torch::Tensor>, torch::Tensor,
                torch::Tensor, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "lora_sites (cpu): built without AVX-512");
}

#endif
