// Synthesizer layers vs multi-head attention of the same width and heads: d = 512, H = 8, l = 4096, float, one
// thread, n = 128 .. 4096. bench/plot.py prints each variant's speed-up over MHA at every n.
//
// FLOPs of a forward over n tokens (d_head = d / H; both layers project values and output, 4 n d^2):
//   MHA               4 n d^2 more (Q, K) + 4 n^2 d          (Q K^T and P V)
//   Dense             2 n d^2 H (hidden) + 2 n^2 d H + 2 n^2 d
//   Random, Fact. R.  2 n^2 d                                (P V; P is kept, it does not depend on the input)
//   Factorized Dense  2 n d (a + b) H + 2 n^2 d
//   Mixture R + V     4 n d^2 + 4 n^2 d                      (Random plus dot-product logits)
// Causal runs count the same FLOPs (the kernels skip the masked half, so their GFLOP/s doubles).
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

constexpr Index kWidth = 512, kHeads = 8, kLength = 4096;

enum Kind { kDense, kRandom, kFactorizedDense, kFactorizedRandom, kMixture };
const char* const kKindNames[] = {"dense", "random", "factorized_dense", "factorized_random", "mixture_random_vanilla"};

SynthesizerConfig config() {
  SynthesizerConfig c;
  c.width = kWidth, c.max_length = kLength, c.heads = kHeads;
  c.a = 64, c.b = 64, c.k = 8;
  return c;
}

template <class S>
std::unique_ptr<SynthesizerLayer<S>> make_layer(int kind, const SynthesizerConfig& c) {
  switch (kind) {
    case kDense: return std::make_unique<DenseSynthesizer<S>>(c, 1);
    case kRandom: return std::make_unique<RandomSynthesizer<S>>(c, 1);
    case kFactorizedDense: return std::make_unique<FactorizedDenseSynthesizer<S>>(c, 1);
    case kFactorizedRandom: return std::make_unique<FactorizedRandomSynthesizer<S>>(c, 1);
    default:
      return std::make_unique<MixtureSynthesizer<S>>(
          c, std::vector<SynthesizerKind>{SynthesizerKind::kRandom, SynthesizerKind::kDotProduct}, 1);
  }
}

/// One layer per kind for the whole process: Random's R alone is H l^2 floats (512 MiB).
const SynthesizerLayer<float>& layer(int kind) {
  static std::unique_ptr<SynthesizerLayer<float>> layers[5];
  if (!layers[kind]) layers[kind] = make_layer<float>(kind, config());
  return *layers[kind];
}

/// The kind's error at d = 64, H = 2, l = 128, n = 100: float against double layers from the same seed.
double synthesizer_error(int kind, const AttentionOptions& o) {
  SynthesizerConfig c;
  c.width = 64, c.max_length = 128, c.heads = 2, c.a = 8, c.b = 16, c.k = 8;
  const Matrix<float> x = random_matrix<float>(100, c.width, 7);
  return relative_error(make_layer<float>(kind, c)->forward(x, o),
                        make_layer<double>(kind, c)->forward(x.cast<double>().eval(), o));
}

double allowed_pairs(Index n, bool causal) { return causal ? double(n) * double(n + 1) / 2 : double(n) * double(n); }

/// FLOPs of a forward; `pairs` is the number of allowed (query, key) pairs (n^2, or n (n + 1) / 2 when causal).
double synthesizer_flops(int kind, double n, double pairs) {
  const double d = double(kWidth), h = double(kHeads), projections = 4 * n * d * d, mix = 2 * pairs * d;
  switch (kind) {
    case kDense: return projections + 2 * n * d * d * h + 2 * pairs * d * h + mix;
    case kFactorizedDense: return projections + 2 * n * d * 128 * h + mix;
    case kMixture: return projections + 4 * n * d * d + 2 * mix;
    default: return projections + mix;
  }
}

void BM_Synthesizer(benchmark::State& state) {
  const int kind = int(state.range(0));
  const Index n = state.range(1);
  AttentionOptions o;
  o.causal = state.range(2) != 0;
  o.threads = 1;
  const SynthesizerLayer<float>& l = layer(kind);
  const Matrix<float> x = random_matrix<float>(n, kWidth, 2);
  Matrix<float> out(n, kWidth);
  const auto call = [&] { l.forward_into(x, out, o); };
  call();  // Random kinds compute and keep their probabilities here, once: the timed calls reuse them
  report(state, synthesizer_flops(kind, double(n), allowed_pairs(n, o.causal)), 1, run_timed(state, call));
  // What a layer with input-independent logits keeps between calls: H n^2 probabilities.
  state.counters["kept_MiB"] = double(l.kept_bytes(n)) / (1 << 20);
  report_workspace(state, l.workspace_bytes(n, o));
  report_error(state, std::to_string(kind) + "/" + std::to_string(state.range(2)),
               [&] { return synthesizer_error(kind, o); });
  state.SetLabel(kKindNames[kind]);
}

void BM_Mha(benchmark::State& state) {
  const Index n = state.range(0);
  AttentionOptions o;
  o.causal = state.range(1) != 0;
  o.threads = 1;
  MultiHeadConfig c;
  c.width = kWidth, c.heads = kHeads;
  static const MultiHeadAttention<float> mha(c, 1);
  const Matrix<float> x = random_matrix<float>(n, kWidth, 2);
  Matrix<float> out(n, kWidth);
  const double d = double(kWidth), nn = double(n);
  report(state, 8 * nn * d * d + 4 * allowed_pairs(n, o.causal) * d, 1,
         run_timed(state, [&] { mha.forward_into(x, out, o); }));
  report_workspace(state, mha.workspace_bytes(n, -1, o));
  report_error(state, std::to_string(state.range(1)),
               [&] { return layer_error<MultiHeadAttention>(c, 100, kWidth, o); });
}

void lengths(benchmark::internal::Benchmark* b, bool with_kind) {
  for (int kind = 0; kind < (with_kind ? 5 : 1); ++kind)
    for (int causal : {0, 1})
      for (Index n = 128; n <= kLength; n *= 2) {
        if (with_kind)
          b->Args({kind, n, causal});
        else
          b->Args({n, causal});
      }
}

BENCHMARK(BM_Synthesizer)
    ->ArgNames({"kind", "n", "causal"})
    ->Apply([](benchmark::internal::Benchmark* b) { lengths(b, true); })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Mha)
    ->ArgNames({"n", "causal"})
    ->Apply([](benchmark::internal::Benchmark* b) { lengths(b, false); })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
