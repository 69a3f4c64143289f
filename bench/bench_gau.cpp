// GAU (each normalisation) and FLASH against a transformer block of the same parameter count: multi-head attention
// (8 heads) plus a ReLU feed-forward whose width f makes 4 d^2 + 2 d f equal FLASH's parameters. d = 512, e = 2 d,
// s = 128, c = 256, float, one thread, n = 256 .. 16384. bench/plot.py prints FLASH's growth and its speed-up.
//
// FLOPs of a forward over n tokens (pairs = n^2, or n (n + 1) / 2 causal):
//   GAU        2 n d (2 e + s) + 2 n e d (projections) + 2 (s + e) per pair
//   FLASH      the same projections + 2 (s + e) per pair inside chunks + 4 n s e (linear part)
//   MHA + FFN  8 n d^2 + 4 d per pair + 4 n d f
#include <string>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

constexpr Index kD = 512, kE = 2 * kD, kS = 128, kChunk = 256, kHeads = 8;

GauConfig gau_config() {
  GauConfig c;
  c.width = kD, c.expansion = kE, c.shared = kS, c.chunk = kChunk;
  return c;
}

/// The feed-forward width that gives MHA + FFN the parameters of FLASH: 4 d^2 + 2 d f = FLASH's count.
Index ffn_width() {
  static const Index f = (FlashAttentionLayer<float>(gau_config()).parameter_count() - 4 * kD * kD) / (2 * kD);
  return f;
}

/// d = 64, e = 128, s = 32, c = 32: the size at which max_err compares float with double.
GauConfig small_config() {
  GauConfig c;
  c.width = 64, c.expansion = 128, c.shared = 32, c.chunk = 32;
  return c;
}

double pairs(Index n, bool causal) { return causal ? double(n) * double(n + 1) / 2 : double(n) * double(n); }

double projection_flops(Index n) { return 2.0 * double(n) * kD * (2 * kE + kS) + 2.0 * double(n) * kE * kD; }

const char* const kNormNames[] = {"relu2", "relu2_shared", "softmax_plus"};

void BM_Gau(benchmark::State& state) {
  const auto norm = static_cast<GauNormalization>(state.range(0));
  const Index n = state.range(1);
  GauOptions o;
  o.normalization = norm, o.causal = state.range(2) != 0, o.threads = 1;
  static const GatedAttentionUnit<float> gau(gau_config(), 1);
  const Matrix<float> x = random_matrix<float>(n, kD, 2);
  Matrix<float> out(n, kD);
  const int64_t heap = run_timed(state, [&] { gau.forward_into(x, out, o); });
  report(state, projection_flops(n) + 2.0 * (kS + kE) * pairs(n, o.causal), 1, heap);
  report_workspace(state, gau.workspace_bytes(n, o));
  report_error(state, std::to_string(state.range(0)) + "/" + std::to_string(state.range(2)),
               [&] { return layer_error<GatedAttentionUnit>(small_config(), 100, 64, o); });
  state.SetLabel(kNormNames[state.range(0)]);
}

void BM_Flash(benchmark::State& state) {
  const Index n = state.range(0);
  GauOptions o;
  o.causal = state.range(1) != 0, o.threads = 1;
  static const FlashAttentionLayer<float> flash(gau_config(), 1);
  const Matrix<float> x = random_matrix<float>(n, kD, 2);
  Matrix<float> out(n, kD);
  const int64_t heap = run_timed(state, [&] { flash.forward_into(x, out, o); });
  // Linear part: 2 s e per token for the state, 2 s e per token for the queries; causal skips the last chunk's
  // state and the first chunk's queries.
  double quad = 0, linear_tokens = 2.0 * double(n);
  for (Index r0 = 0; r0 < n; r0 += kChunk) quad += pairs(std::min(kChunk, n - r0), o.causal);
  if (o.causal) linear_tokens -= double(std::min(kChunk, n)) + double(n - (n - 1) / kChunk * kChunk);
  report(state, projection_flops(n) + 2.0 * (kS + kE) * quad + 2.0 * linear_tokens * kS * kE, 1, heap);
  report_workspace(state, flash.workspace_bytes(n, o));
  report_error(state, std::to_string(state.range(1)),
               [&] { return layer_error<FlashAttentionLayer>(small_config(), 100, 64, o); });
}

/// Multi-head attention (8 heads) and a ReLU feed-forward of width f, as one block: y = FFN(MHA(x)).
void BM_MhaFfn(benchmark::State& state) {
  const Index n = state.range(0), f = ffn_width();
  AttentionOptions o;
  o.causal = state.range(1) != 0, o.threads = 1;
  MultiHeadConfig c;
  c.width = kD, c.heads = kHeads;
  static const MultiHeadAttention<float> mha(c, 1);
  static const Matrix<float> w1 = random_matrix<float>(kD, ffn_width(), 3), w2 = random_matrix<float>(ffn_width(), kD, 4);
  const Matrix<float> x = random_matrix<float>(n, kD, 2);
  Matrix<float> a(n, kD), hidden, y;
  const int64_t heap = run_timed(state, [&] {
    mha.forward_into(x, a, o);
    detail::dense(detail::matrix_view(a), w1, Matrix<float>(), hidden, 1);
    hidden = hidden.cwiseMax(0.f);
    detail::dense(detail::matrix_view(hidden), w2, Matrix<float>(), y, 1);
  });
  report(state, 8.0 * double(n) * kD * kD + 4.0 * kD * pairs(n, o.causal) + 4.0 * double(n) * kD * double(f), 1, heap);
  // The layer's workspace, then the feed-forward's hidden and output (the first call allocates them) and products.
  const Index hidden_bytes = detail::heap_bytes<float>(n * f), y_bytes = detail::heap_bytes<float>(n * kD);
  report_workspace(
      state, std::max({mha.workspace_bytes(n, -1, o), hidden_bytes + detail::dense_workspace_bytes<float>(n, kD, f, 1),
                       hidden_bytes + y_bytes + detail::dense_workspace_bytes<float>(n, f, kD, 1)}));
  report_error(state, std::to_string(state.range(1)),  // the attention part (the feed-forward is two dense products)
               [&] { return layer_error<MultiHeadAttention>(c, 100, kD, o); });
  state.counters["ffn_width"] = double(f);
}

void lengths(benchmark::internal::Benchmark* b, int norms) {
  for (int norm = 0; norm < std::max(norms, 1); ++norm)
    for (int causal : {0, 1})
      for (Index n = 256; n <= 16384; n *= 2) {
        if (norms > 0)
          b->Args({norm, n, causal});
        else
          b->Args({n, causal});
      }
}

BENCHMARK(BM_Gau)
    ->ArgNames({"norm", "n", "causal"})
    ->Apply([](benchmark::internal::Benchmark* b) { lengths(b, 3); })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// FLASH's growth with n is a target: at least a second per size (3 calls at n = 16384) so one slow call on a shared
// machine does not decide it.
BENCHMARK(BM_Flash)
    ->ArgNames({"n", "causal"})
    ->Apply([](benchmark::internal::Benchmark* b) { lengths(b, 0); })
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_MhaFfn)
    ->ArgNames({"n", "causal"})
    ->Apply([](benchmark::internal::Benchmark* b) { lengths(b, 0); })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
