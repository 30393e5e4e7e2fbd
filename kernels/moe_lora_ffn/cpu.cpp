// MixLoRA's routed experts on x86 CPUs with AVX-512: one pass per (row, expert) pair over that
// expert's weights, all of a pair's chain (x shrink, gate/up expands, SiLU, hidden sum, down
// shrink, down expand) in registers and L1, no [pairs, I] temporaries. Pairs run in group order
// (slot * E + expert), so a group's weights (~200 KB at r = 8 for SmolLM2's shape) stay in L2
// across its pairs. Semantics and shapes: kernels/moe_lora_ffn/cpu.py; the torch reference is
// kernels/moe_lora_ffn/reference.py.
//
// Row partition: each thread owns a contiguous range of routed rows and walks every pair in
// group order, skipping other threads' rows, so no two threads write the same output row and a
// row's pairs are always summed in the same order (its groups share its slot, so group order is
// expert order): a row's result never depends on what else is in the batch.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

// Named, not anonymous: the sources are built as one translation unit (kernels/_cpu_build.py).
namespace mixserve_moe {

struct Pair {
  int64_t group;
  int64_t row;
  float weight;
};

// exp(x), x clamped to [-87, 87]: 2^n * 2^f with f in [-0.5, 0.5] and 2^f = e^y, y = f ln 2, by
// its Taylor series to degree 7 (truncation below 2e-8 relative for |y| <= 0.35).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + e^-g); the reciprocal by rcp14 and one Newton step (~2^-28 relative), as a
// division costs a dozen cycles per vector.
inline __m512 silu16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(g, r);
}

struct Args {
  const float* x;        // [T, H]
  const float* gate_up;  // [T, 2I]
  const int64_t* tokens; // [N]
  const float* a_gu;     // [G, H, 2R]: gate's and up's A side by side per input feature
  const float* bt_gate;  // [G, R, I]
  const float* bt_up;    // [G, R, I]
  const float* a_down;   // [G, I, R]
  const float* bt_down;  // [G, R, H]
  const float* scale_gate;
  const float* scale_up;
  const float* scale_down;  // [G] each
  float* hidden;            // [N, I]
  float* down;              // [N, H]
  int64_t hidden_size;
  int64_t intermediate;
};

template <int R>
void run_pair(const Args& a, const Pair& pair) {
  constexpr int kShrinkVecs = 2 * R / 16;  // zmm per input feature of A_gu
  // Independent accumulators hide the FMA latency; fewer at high rank to stay within 32 zmm.
  constexpr int kUnroll = kShrinkVecs <= 2 ? 4 : (kShrinkVecs <= 4 ? 2 : 1);
  constexpr int kDownVecs = R >= 16 ? R / 16 : 1;
  const int64_t H = a.hidden_size, I = a.intermediate, g = pair.group;
  const int64_t token = a.tokens[pair.row];
  const float* x = a.x + token * H;
  const float* a_gu = a.a_gu + g * H * 2 * R;

  __m512 acc[kUnroll][kShrinkVecs];  // [2R] = A_gu^T x
  for (auto& lane : acc)
    for (auto& v : lane) v = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += kUnroll) {
    for (int u = 0; u < kUnroll; ++u) {
      const __m512 xv = _mm512_set1_ps(x[h + u]);
      const float* row = a_gu + (h + u) * 2 * R;
      for (int k = 0; k < kShrinkVecs; ++k)
        acc[u][k] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row + 16 * k), acc[u][k]);
    }
  }
  alignas(64) float shrunk[2 * R];
  for (int k = 0; k < kShrinkVecs; ++k) {
    __m512 sum = acc[0][k];
    for (int u = 1; u < kUnroll; ++u) sum = _mm512_add_ps(sum, acc[u][k]);
    _mm512_store_ps(shrunk + 16 * k, sum);
  }
  __m512 coef_gate[R], coef_up[R];
  for (int r = 0; r < R; ++r) {
    coef_gate[r] = _mm512_set1_ps(shrunk[r] * a.scale_gate[g]);
    coef_up[r] = _mm512_set1_ps(shrunk[R + r] * a.scale_up[g]);
  }

  const float* base = a.gate_up + token * 2 * I;
  const float* bt_gate = a.bt_gate + g * R * I;
  const float* bt_up = a.bt_up + g * R * I;
  const float* a_down = a.a_down + g * I * R;
  float* hidden = a.hidden + pair.row * I;
  const __m512 weight = _mm512_set1_ps(pair.weight);
  __m512 down_acc[2][kDownVecs];  // [R] = A_down^T h, two accumulators
  for (auto& lane : down_acc)
    for (auto& v : lane) v = _mm512_setzero_ps();
  // Lanes 0-7 take element 2k of a 16-wide h block, lanes 8-15 element 2k + 1: at rank 8 one
  // zmm covers two rows of A_down.
  const __m512i pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t i = 0; i < I; i += 16) {
    __m512 gv = _mm512_loadu_ps(base + i);
    __m512 uv = _mm512_loadu_ps(base + I + i);
    for (int r = 0; r < R; ++r) {
      gv = _mm512_fmadd_ps(coef_gate[r], _mm512_loadu_ps(bt_gate + r * I + i), gv);
      uv = _mm512_fmadd_ps(coef_up[r], _mm512_loadu_ps(bt_up + r * I + i), uv);
    }
    const __m512 hv = _mm512_mul_ps(silu16(gv), uv);
    _mm512_storeu_ps(hidden + i, _mm512_fmadd_ps(weight, hv, _mm512_loadu_ps(hidden + i)));
    if constexpr (R == 8) {
      for (int k = 0; k < 8; ++k) {
        const __m512 h2 = _mm512_permutexvar_ps(
            _mm512_add_epi32(pair_lanes, _mm512_set1_epi32(2 * k)), hv);
        down_acc[k & 1][0] =
            _mm512_fmadd_ps(h2, _mm512_loadu_ps(a_down + (i + 2 * k) * 8), down_acc[k & 1][0]);
      }
    } else {
      alignas(64) float hs[16];
      _mm512_store_ps(hs, hv);
      for (int j = 0; j < 16; ++j) {
        const __m512 hb = _mm512_set1_ps(hs[j]);
        const float* row = a_down + (i + j) * R;
        for (int k = 0; k < kDownVecs; ++k)
          down_acc[j & 1][k] = _mm512_fmadd_ps(hb, _mm512_loadu_ps(row + 16 * k), down_acc[j & 1][k]);
      }
    }
  }
  alignas(64) float down_shrunk[16 * kDownVecs];
  for (int k = 0; k < kDownVecs; ++k)
    _mm512_store_ps(down_shrunk + 16 * k, _mm512_add_ps(down_acc[0][k], down_acc[1][k]));
  const float down_coef = pair.weight * a.scale_down[g];
  __m512 coef_down[R];
  for (int r = 0; r < R; ++r) {
    const float value = R == 8 ? down_shrunk[r] + down_shrunk[8 + r] : down_shrunk[r];
    coef_down[r] = _mm512_set1_ps(value * down_coef);
  }
  const float* bt_down = a.bt_down + g * R * H;
  float* down = a.down + pair.row * H;
  for (int64_t o = 0; o < H; o += 16) {
    __m512 v = _mm512_loadu_ps(down + o);
    for (int r = 0; r < R; ++r)
      v = _mm512_fmadd_ps(coef_down[r], _mm512_loadu_ps(bt_down + r * H + o), v);
    _mm512_storeu_ps(down + o, v);
  }
}

template <int R>
void run_rows(const Args& a, const std::vector<Pair>& pairs, int64_t begin, int64_t end) {
  for (const Pair& pair : pairs)
    if (pair.row >= begin && pair.row < end) run_pair<R>(a, pair);
}

}  // namespace mixserve_moe

std::vector<torch::Tensor> moe_lora_ffn(
    torch::Tensor x, torch::Tensor gate_up, torch::Tensor tokens, torch::Tensor slots,
    torch::Tensor weights, torch::Tensor a_gu, torch::Tensor bt_gate, torch::Tensor bt_up,
    torch::Tensor a_down, torch::Tensor bt_down, torch::Tensor scale_gate,
    torch::Tensor scale_up, torch::Tensor scale_down) {
  using namespace mixserve_moe;
  const int64_t num_rows = weights.size(0), num_experts = weights.size(1);
  const int64_t H = x.size(1), I = bt_gate.size(2), R = bt_gate.size(1);
  auto hidden = torch::zeros({num_rows, I}, x.options());
  auto down = torch::zeros({num_rows, H}, x.options());
  const float* w = weights.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* token = tokens.data_ptr<int64_t>();
  const int64_t num_groups = bt_gate.size(0), num_tokens = x.size(0);
  std::vector<Pair> pairs;
  pairs.reserve(num_rows * 2);
  // Indices are checked here, outside the parallel region: a bad one is an error, not a read
  // out of bounds.
  for (int64_t n = 0; n < num_rows; ++n) {
    TORCH_CHECK(token[n] >= 0 && token[n] < num_tokens, "moe_lora_ffn (cpu): row ", n,
                " reads token ", token[n], " of ", num_tokens);
    for (int64_t e = 0; e < num_experts; ++e) {
      if (!(w[n * num_experts + e] > 0.f)) continue;
      const int64_t group = slot[n] * num_experts + e;
      TORCH_CHECK(group >= 0 && group < num_groups, "moe_lora_ffn (cpu): slot ", slot[n],
                  " expert ", e, " is past the tables' ", num_groups, " groups");
      pairs.push_back({group, n, w[n * num_experts + e]});
    }
  }
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const Pair& l, const Pair& r) { return l.group < r.group; });
  const Args args{x.data_ptr<float>(),       gate_up.data_ptr<float>(),
                  token,                      a_gu.data_ptr<float>(),
                  bt_gate.data_ptr<float>(),  bt_up.data_ptr<float>(),
                  a_down.data_ptr<float>(),   bt_down.data_ptr<float>(),
                  scale_gate.data_ptr<float>(), scale_up.data_ptr<float>(),
                  scale_down.data_ptr<float>(), hidden.data_ptr<float>(),
                  down.data_ptr<float>(),     H,
                  I};
  TORCH_CHECK(R == 8 || R == 16 || R == 32 || R == 64, "moe_lora_ffn (cpu): rank ", R,
              " not compiled");
  parallel_rows(num_rows, [&](int64_t begin, int64_t end) {
    switch (R) {
      case 8: run_rows<8>(args, pairs, begin, end); break;
      case 16: run_rows<16>(args, pairs, begin, end); break;
      case 32: run_rows<32>(args, pairs, begin, end); break;
      default: run_rows<64>(args, pairs, begin, end); break;
    }
  });
  return {hidden, down};
}

#else  // no AVX-512 at build time: the Python wrapper falls back to the torch reference

std::vector<torch::Tensor> moe_lora_ffn(
    torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
    torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
    torch::Tensor) {
  TORCH_CHECK(false, "moe_lora_ffn (cpu): built without AVX-512");
}

#endif
