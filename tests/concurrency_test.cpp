// Thread safety: every family called from 8 threads at once, on shared const inputs and shared const layers, gives
// bit for bit what a serial call gives. Built into every preset; the tsan preset runs it under ThreadSanitizer
// (with std::thread instead of OpenMP, whose runtime TSan cannot see into).
#include <gtest/gtest.h>

#include <attnkit/attnkit.hpp>

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace attnkit::testing {
namespace {

constexpr int kThreads = 8;
constexpr int kCallsPerThread = 3;
constexpr Index kN = 67, kWidth = 32, kHeads = 4;

using Call = std::function<Matrix<float>()>;

struct Case {
  std::string name;
  Call call;
};

/// Runs `call` once serially, then kCallsPerThread times on each of kThreads threads started together; every
/// concurrent result must equal the serial one exactly.
void expect_same_concurrently(const Case& c, const Call& serial_call) {
  const Matrix<float> serial = serial_call();
  ASSERT_GT(serial.size(), 0) << c.name;
  ASSERT_TRUE(serial.allFinite()) << c.name;
  std::vector<std::vector<Matrix<float>>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int r = 0; r < kCallsPerThread; ++r) results[size_t(t)].push_back(c.call());
    });
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t)
    for (const Matrix<float>& r : results[size_t(t)]) {
      ASSERT_EQ(r.rows(), serial.rows()) << c.name;
      ASSERT_EQ(r.cols(), serial.cols()) << c.name;
      EXPECT_TRUE((r.array() == serial.array()).all()) << c.name << ": thread " << t << " differs from the serial call";
    }
}

/// Inputs and layers shared by every case, all const once built.
struct Shared {
  Matrix<float> x = random_matrix<float>(kN, kWidth, 1);
  Matrix<float> q = random_matrix<float>(kN, kWidth, 2), k = random_matrix<float>(kN + 6, kWidth, 3),
                v = random_matrix<float>(kN + 6, 24, 4);
  Matrix<float> bias = random_matrix<float>(kN, kN + 6, 5);
  MultiHeadAttention<float> mha = make_mha();
  PerformerFeatures<float> performer{kWidth, 48, 9};
  GatedAttentionUnit<float> gau{gau_config(), 12};
  FlashAttentionLayer<float> flash{gau_config(), 13};

  static MultiHeadAttention<float> make_mha() {
    MultiHeadConfig c;
    c.width = kWidth, c.heads = kHeads, c.kv_heads = 2, c.rope = true, c.projection_bias = true;
    return MultiHeadAttention<float>(c, 7);
  }
  static GauConfig gau_config() {
    GauConfig c;
    c.width = kWidth, c.shared = 16, c.chunk = 16, c.bias = true;
    return c;
  }
  static SynthesizerConfig synthesizer_config() {
    SynthesizerConfig c;
    c.width = kWidth, c.max_length = 72, c.heads = kHeads, c.a = 8, c.b = 9, c.k = 5;
    return c;
  }
};

const Shared& shared() {
  static const Shared s;
  return s;
}

/// Every family, with the library's own threading at its default (all cores) so calls nest.
std::vector<Case> cases() {
  const Shared& s = shared();
  AttentionOptions causal;
  causal.causal = true;
  AttentionOptions decorated;
  decorated.window_left = 9, decorated.alibi_slope = 0.25, decorated.softcap = 20, decorated.log_n_scale = true;
  LinearOptions linear_causal;
  linear_causal.causal = true;
  GauOptions gau_causal;
  gau_causal.causal = true;
  return {
      {"sdpa", [&s] { return scaled_dot_product_attention(s.q, s.k, s.v); }},
      {"sdpa causal + lse",
       [&s, causal] {
         Matrix<float> out(kN, s.v.cols() + 1);
         Vector<float> lse(kN);
         scaled_dot_product_attention(s.q, s.k, s.v, out.leftCols(s.v.cols()), lse, causal);
         out.col(s.v.cols()) = lse;
         return out;
       }},
      {"sdpa options + bias", [&s, decorated] { return scaled_dot_product_attention(s.q, s.k, s.v, decorated, s.bias); }},
      {"reference sdpa", [&s, causal] { return reference::scaled_dot_product_attention(s.q, s.k, s.v, causal); }},
      {"multi-head (GQA, RoPE)", [&s, causal] { return s.mha.forward(s.x, causal); }},
      {"multi-head decoding",
       [&s] {
         KVCache<float> cache = s.mha.make_cache(kN);
         Matrix<float> out(kN, kWidth);
         for (Index t = 0; t < kN; t += 8) {
           const Index rows = std::min<Index>(8, kN - t);
           out.middleRows(t, rows) = s.mha.forward_step(s.x.middleRows(t, rows), cache);
         }
         return out;
       }},
      {"sparse local_atrous",
       [&s] { return sparse_attention(s.q, s.k.topRows(kN), s.v.topRows(kN), SparsePattern::local_atrous(5)); }},
      {"sparse strided causal",
       [&s, causal] { return sparse_attention(s.q, s.k.topRows(kN), s.v.topRows(kN), SparsePattern::strided(8), causal); }},
      {"sparse atrous (short classes, as lanes)",
       [&s] { return sparse_attention(s.q, s.k.topRows(kN), s.v.topRows(kN), SparsePattern::atrous(17)); }},
      {"linear elu+1", [&s] { return linear_attention(s.q, s.k, s.v, EluPlusOne{}); }},
      {"linear Performer causal",
       [&s, linear_causal] { return linear_attention(s.q, s.k.topRows(kN), s.v.topRows(kN), s.performer, linear_causal); }},
      {"efficient attention", [&s] { return efficient_attention(s.q, s.k, s.v); }},
      {"linear recurrent",
       [&s] {
         LinearAttentionState<float, EluPlusOne> state(EluPlusOne{}, kWidth, s.v.cols());
         return Matrix<float>(state.step(s.q, s.k.topRows(kN), s.v.topRows(kN)));
       }},
      {"GAU relu2 causal", [&s, gau_causal] { return s.gau.forward(s.x, gau_causal); }},
      {"GAU softmax_plus",
       [&s] {
         GauOptions o;
         o.normalization = GauNormalization::kSoftmaxPlus;
         return s.gau.forward(s.x, o);
       }},
      {"FLASH non-causal", [&s] { return s.flash.forward(s.x); }},
      {"FLASH causal", [&s, gau_causal] { return s.flash.forward(s.x, gau_causal); }},
      {"attention_weights_from_lse",
       [&s] {
         Matrix<float> out(kN, s.v.cols());
         Vector<float> lse(kN);
         scaled_dot_product_attention(s.q, s.k, s.v, out, lse);
         return attention_weights_from_lse(s.q, s.k, lse, {0, 33, kN - 1});
       }},
  };
}

TEST(Concurrency, EveryFamilyFromEightThreadsEqualsSerial) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    expect_same_concurrently(c, c.call);
  }
}

TEST(Concurrency, OneLibraryThreadPerCallAlsoMatches) {
  const Shared& s = shared();
  AttentionOptions one;
  one.threads = 1;
  const Case c{"sdpa, threads = 1", [&s, one] { return scaled_dot_product_attention(s.q, s.k, s.v, one); }};
  expect_same_concurrently(c, [&s] { return scaled_dot_product_attention(s.q, s.k, s.v); });
}

/// Synthesizers keep the probabilities of their input-independent kinds per length behind a mutex: the first calls
/// race to fill that cache. Each layer is fresh, so the concurrent calls start cold; the serial result comes from an
/// identical layer (same seed).
template <class Layer, class... Extra>
void expect_synthesizer_safe(const std::string& name, const Extra&... extra) {
  const Shared& s = shared();
  AttentionOptions causal;
  causal.causal = true;
  const Layer cold(Shared::synthesizer_config(), extra..., 21), twin(Shared::synthesizer_config(), extra..., 21);
  for (const AttentionOptions& o : {AttentionOptions{}, causal}) {
    const Case c{name, [&cold, &s, o] { return cold.forward(s.x, o); }};
    expect_same_concurrently(c, [&twin, &s, o] { return twin.forward(s.x, o); });
  }
}

TEST(Concurrency, SynthesizersFromColdCaches) {
  expect_synthesizer_safe<DenseSynthesizer<float>>("Dense");
  expect_synthesizer_safe<RandomSynthesizer<float>>("Random");
  expect_synthesizer_safe<FactorizedDenseSynthesizer<float>>("FactorizedDense");
  expect_synthesizer_safe<FactorizedRandomSynthesizer<float>>("FactorizedRandom");
  expect_synthesizer_safe<MixtureSynthesizer<float>>(
      "Mixture", std::vector<SynthesizerKind>{SynthesizerKind::kRandom, SynthesizerKind::kFactorizedRandom,
                                              SynthesizerKind::kDotProduct});
}

// release_cached_workspaces() from another thread while 8 threads run attention (fused tile workspaces and linear
// attention's chunk scratch): it frees only the caches no call is using (under ThreadSanitizer, no race on a
// workspace), and every result still equals the serial one.
TEST(Concurrency, ReleasingCachedWorkspacesWhileCallsRun) {
  const Matrix<float> q = random_matrix<float>(kN, kWidth, 1), k = random_matrix<float>(kN + 10, kWidth, 2),
                      v = random_matrix<float>(kN + 10, kWidth, 3);
  AttentionOptions o;
  o.threads = 1;
  LinearOptions lo;
  lo.threads = 1;
  const Matrix<float> serial = scaled_dot_product_attention(q, k, v, o);
  const Matrix<float> serial_linear = linear_attention(q, k, v, EluPlusOne{}, lo);
  std::atomic<bool> done{false};
  std::thread releaser([&] {
    while (!done.load()) release_cached_workspaces();
  });
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int r = 0; r < 4 * kCallsPerThread; ++r) {
        if (!(scaled_dot_product_attention(q, k, v, o) == serial)) ++mismatches[size_t(t)];
        if (!(linear_attention(q, k, v, EluPlusOne{}, lo) == serial_linear)) ++mismatches[size_t(t)];
      }
    });
  for (std::thread& t : threads) t.join();
  done = true;
  releaser.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[size_t(t)], 0) << "thread " << t;
}

// The parallel loop under everything: with std::thread it borrows a pool kept between calls, which one call uses at a
// time. Loops from eight threads at once, each with loops nested in its tasks (on the calling thread and on the
// pool's), must each run every task exactly once, with no deadlock; under ThreadSanitizer, without a race.
TEST(Concurrency, ParallelLoopsFromManyThreadsAndNestedRunEveryTaskOnce) {
  constexpr Index kTasks = 37, kInner = 5;
  std::vector<std::vector<std::atomic<int>>> outer(kThreads), inner(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    outer[size_t(t)] = std::vector<std::atomic<int>>(kTasks);
    inner[size_t(t)] = std::vector<std::atomic<int>>(kTasks * kInner);
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int r = 0; r < kCallsPerThread; ++r)
        detail::parallel_for(
            kTasks, t % 2 == 0 ? 2 : 0, [] { return 0; },
            [&](Index task, int&) {
              ++outer[size_t(t)][size_t(task)];
              if (task % 3 == 0)
                detail::parallel_for(
                    kInner, 2, [] { return 0; },
                    [&](Index i, int&) { ++inner[size_t(t)][size_t(task * kInner + i)]; });
            });
    });
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t)
    for (Index task = 0; task < kTasks; ++task) {
      EXPECT_EQ(outer[size_t(t)][size_t(task)].load(), kCallsPerThread) << "thread " << t << ", task " << task;
      for (Index i = 0; i < kInner; ++i)
        EXPECT_EQ(inner[size_t(t)][size_t(task * kInner + i)].load(), task % 3 == 0 ? kCallsPerThread : 0)
            << "thread " << t << ", task " << task << ", inner " << i;
    }
}

}  // namespace
}  // namespace attnkit::testing
