// The documented workspace of every layer and of the linear-family calls that had none (MHA forward and decode
// step, GAU, FLASH, the synthesizers, Efficient Attention, the recurrent step) against the heap a call really takes,
// counted by the malloc interposer in support/counting_malloc.cpp: each figure must bound the measured peak, and on
// problems big enough for the buffers to dominate it must be tight (at most twice the measurement), so the
// benchmark table's workspace column means something. Odd sizes, one and two threads. Built only without
// sanitizers, which replace malloc themselves.
#include <gtest/gtest.h>

#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../support/counting_malloc.hpp"
#include "test_util.hpp"

namespace attnkit::testing {
namespace {

using F = Matrix<float>;
/// Allocations a call may make besides its workspace: std::thread's bookkeeping when OpenMP is off.
constexpr int64_t kSlack = 16 * 1024;

struct Case {
  std::string what;
  std::function<void()> call;  ///< run once to warm up (thread pool, kept probabilities), then measured
  Index documented;
  bool big;  ///< buffers dominate: the figure must also be within 2x of the measurement
};

void check(const Case& c) {
  SCOPED_TRACE(c.what);
  c.call();
  release_cached_workspaces();  // measure what a call allocates, not what an earlier one left in the thread caches
  const int64_t heap = heap::peak_during(c.call);
  std::printf("  %-58s heap %9.1f KiB, documented %9.1f KiB (%.2f)\n", c.what.c_str(), double(heap) / 1024,
              double(c.documented) / 1024, double(heap) / double(c.documented));
  EXPECT_LE(heap, c.documented + kSlack) << "measured " << heap << " bytes";
  if (c.big) {
    EXPECT_GE(2 * heap, c.documented) << "documented " << c.documented << " bytes is loose";
  }
}

std::string name(const char* what, Index n, int threads, const char* extra = "") {
  return std::string(what) + " n=" + std::to_string(n) + " threads=" + std::to_string(threads) + extra;
}

TEST(Workspace, MultiHeadAttentionForwardAndStep) {
  for (const auto& [width, heads, kv_heads] : {std::tuple<Index, Index, Index>{64, 4, 4}, {96, 6, 2}}) {
    MultiHeadConfig config;
    config.width = width, config.heads = heads, config.kv_heads = kv_heads;
    const auto layer = std::make_shared<MultiHeadAttention<float>>(config, 1);
    for (const Index n : {Index(7), Index(301)})
      for (const int threads : {1, 2}) {
        AttentionOptions o;
        o.threads = threads, o.causal = n == 7;
        const auto x = std::make_shared<F>(random_matrix<float>(n, width, 2));
        const auto out = std::make_shared<F>(n, width);
        check({name("MHA self", n, threads, kv_heads < heads ? " GQA" : ""), [=] { layer->forward_into(*x, *out, o); },
               layer->workspace_bytes(n, -1, o), n > 100});
        // m = 9001: 7 rows split their keys into chunks (split-K's partial outputs), 301 rows run whole.
        for (const Index m : {Index(131), Index(9001)}) {
          const auto kv = std::make_shared<F>(random_matrix<float>(m, width, 3));
          check({name("MHA cross", n, threads, (" m=" + std::to_string(m)).c_str()),
                 [=] { layer->forward_into(*x, *kv, *kv, *out, o); }, layer->workspace_bytes(n, m, o), n > 100});
        }
      }
    for (const Index cached : {Index(40), Index(2047)})
      for (const int threads : {1, 2}) {
        AttentionOptions o;
        o.threads = threads;
        const auto cache = std::make_shared<KVCache<float>>(layer->make_cache(cached + 8));
        layer->forward_step(random_matrix<float>(cached, width, 4), *cache);
        const auto token = std::make_shared<F>(random_matrix<float>(1, width, 5));
        check({name("MHA step, cached", cached, threads),
               [=] {
                 layer->forward_step(*token, *cache, o);
                 cache->truncate(cached);
               },
               layer->step_workspace_bytes(1, cached, o), false});
      }
  }
}

// Each thread keeps its tile workspace between calls: a second call of a shape allocates (almost) nothing, the same
// output comes back, and release_cached_workspaces() frees the caches so that the next call allocates the whole
// documented workspace again, on one thread and on two. With two threads the schedule decides which threads run a
// first call's tiles (one may take them all while the other is still starting): a thread allocates its workspace in
// the first call it runs tiles in, so of two warm calls one allocates nothing and both together at most one thread's.
TEST(Workspace, ThreadsKeepTheirTileWorkspaceUntilReleased) {
  for (const int threads : {1, 2}) {
    SCOPED_TRACE(threads);
    const Index n = 301, d = 64;
    const F q = random_matrix<float>(n, d, 1), k = random_matrix<float>(n, d, 2), v = random_matrix<float>(n, d, 3);
    F out(n, d), again(n, d);
    AttentionOptions o;
    o.threads = threads;
    const Index per_thread = scaled_dot_product_attention_workspace_bytes<float>(n, n, d, d, o);
    const Index documented = detail::resolve_threads(threads) * per_thread;
    scaled_dot_product_attention(q, k, v, out, o);
    const int64_t warm = heap::peak_during([&] { scaled_dot_product_attention(q, k, v, again, o); });
    EXPECT_TRUE(out == again);
    if (threads == 1) {
      EXPECT_LE(warm, kSlack) << "a warm call allocated " << warm << " bytes";
    } else {
      const int64_t warmer = heap::peak_during([&] { scaled_dot_product_attention(q, k, v, again, o); });
      EXPECT_TRUE(out == again);
      EXPECT_LE(std::min(warm, warmer), kSlack) << "two warm calls allocated " << warm << " and " << warmer << " bytes";
      EXPECT_LE(warm + warmer, per_thread + 2 * kSlack) << "two warm calls allocated " << warm << " and " << warmer;
    }
    release_cached_workspaces();
    const int64_t cold = heap::peak_during([&] { scaled_dot_product_attention(q, k, v, again, o); });
    EXPECT_TRUE(out == again);
    EXPECT_GE(2 * cold, documented) << "after the release a call allocated only " << cold << " bytes";
    EXPECT_LE(cold, documented + kSlack);
  }
}

// Linear attention's chunk scratch is kept per thread as well: a warm call gives the same output (every buffer is sized
// and filled before it is read), release_cached_workspaces() frees the scratch, and the next call allocates and keeps
// it again. Non-causal (scratch per worker) and causal, Efficient Attention.
TEST(Workspace, ThreadsKeepTheirLinearScratchUntilReleased) {
  for (const int threads : {1, 2})
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("threads " + std::to_string(threads) + (causal ? " causal" : ""));
      const Index n = 512, d = 24, dv = 40;  // whole chunks: a short last chunk resizes some buffers (same results)
      const F q = random_matrix<float>(n, d, 1), k = random_matrix<float>(n, d, 2), v = random_matrix<float>(n, dv, 3);
      F out(n, dv), again(n, dv);
      LinearOptions o;
      o.threads = threads;
      o.causal = causal;
      const auto call = [&](F& dst) {
        linear_attention(q, k, v, dst, Taylor{}, o);
        if (!causal) efficient_attention(q, k, v, dst, o);
      };
      call(out);
      const int64_t warm = heap::peak_during([&] { call(again); });
      EXPECT_TRUE(out == again);
      // What the threads keep is counted in the bytes left live, which release_cached_workspaces() frees and the next
      // call allocates again: at least one chunk's scratch (the default's rows for this shape: its inputs, features
      // and values), whichever threads ran the chunks. Peaks are compared on one thread only: with two threads
      // sharing one busy CPU, when each thread's scratch appears against the states' allocations varies, and a cold
      // call's peak once came out 408 bytes short of a warm call's plus one scratch.
      const Index chunk = detail::linear_chunk<float>(o, detail::linear_shape<float>(Taylor{}, d, dv));
      const int64_t scratch = int64_t(sizeof(float)) * chunk * (d + 2 * (d + 1) + dv);
      const int64_t held = heap::stats().current;
      release_cached_workspaces();
      const int64_t released = heap::stats().current;
      const int64_t cold = heap::peak_during([&] { call(again); });
      const int64_t kept = heap::stats().current - released;
      EXPECT_TRUE(out == again);
      EXPECT_GE(held - released, scratch) << "release_cached_workspaces() freed " << held - released << " bytes";
      EXPECT_GE(kept, scratch) << "a call after the release kept " << kept << " bytes";
      // On one thread the warm call reused the scratch the first call kept, so the cold call's peak is at least one
      // scratch above the warm call's (with two, see above).
      if (threads == 1) {
        EXPECT_GE(cold - warm, scratch) << "warm " << warm << " bytes, cold " << cold;
      }
    }
}

TEST(Workspace, GauAndFlash) {
  GauConfig config;
  config.width = 48, config.shared = 17, config.chunk = 13;
  const auto gau = std::make_shared<GatedAttentionUnit<float>>(config, 1);
  const auto flash = std::make_shared<FlashAttentionLayer<float>>(config, 1);
  for (const Index n : {Index(7), Index(300)})
    for (const int threads : {1, 2})
      for (const bool causal : {false, true}) {
        GauOptions o;
        o.threads = threads, o.causal = causal;
        const auto x = std::make_shared<F>(random_matrix<float>(n, config.width, 2));
        const auto out = std::make_shared<F>(n, config.width);
        const char* c = causal ? " causal" : "";
        check({name("FLASH", n, threads, c), [=] { flash->forward_into(*x, *out, o); }, flash->workspace_bytes(n, o),
               n > 100});
        for (const auto norm : {GauNormalization::kRelu2, GauNormalization::kSoftmaxPlus}) {
          o.normalization = norm;
          check({name("GAU", n, threads, norm == GauNormalization::kRelu2 ? " relu2" : " softmax_plus"),
                 [=] { gau->forward_into(*x, *out, o); }, gau->workspace_bytes(n, o), n > 100});
        }
      }
}

TEST(Workspace, Synthesizers) {
  SynthesizerConfig config;
  config.width = 60, config.heads = 3, config.max_length = 400, config.a = 16, config.b = 25, config.k = 7;
  using Kind = SynthesizerKind;
  const std::vector<std::pair<std::string, std::shared_ptr<SynthesizerLayer<float>>>> layers = {
      {"Dense", std::make_shared<DenseSynthesizer<float>>(config, 1)},
      {"Random", std::make_shared<RandomSynthesizer<float>>(config, 1)},
      {"FactorizedDense", std::make_shared<FactorizedDenseSynthesizer<float>>(config, 1)},
      {"FactorizedRandom", std::make_shared<FactorizedRandomSynthesizer<float>>(config, 1)},
      {"Mixture(Random, DotProduct)",
       std::make_shared<MixtureSynthesizer<float>>(config, std::vector<Kind>{Kind::kRandom, Kind::kDotProduct}, 1)},
      {"Mixture(all five)", std::make_shared<MixtureSynthesizer<float>>(
                                config,
                                std::vector<Kind>{Kind::kDense, Kind::kRandom, Kind::kFactorizedDense,
                                                  Kind::kFactorizedRandom, Kind::kDotProduct},
                                1)},
  };
  for (const auto& [what, layer] : layers)
    for (const Index n : {Index(7), Index(300)})
      for (const int threads : {1, 2}) {
        AttentionOptions o;
        o.threads = threads, o.causal = threads == 2;
        const auto x = std::make_shared<F>(random_matrix<float>(n, config.width, 2));
        const auto out = std::make_shared<F>(n, config.width);
        const auto l = layer;
        check(
            {name(what.c_str(), n, threads), [=] { l->forward_into(*x, *out, o); }, l->workspace_bytes(n, o), n > 100});
      }
  EXPECT_EQ(layers[1].second->kept_bytes(300), 3 * 300 * 300 * Index(sizeof(float)));
  EXPECT_EQ(layers[0].second->kept_bytes(300), 0);
}

TEST(Workspace, EfficientAttentionAndRecurrentStep) {
  for (const Index n : {Index(7), Index(3001)})
    for (const int threads : {1, 2}) {
      const Index d = 37;
      const auto q = std::make_shared<F>(random_matrix<float>(n, d, 1));
      const auto k = std::make_shared<F>(random_matrix<float>(n, d, 2));
      const auto v = std::make_shared<F>(random_matrix<float>(n, d, 3));
      const auto out = std::make_shared<F>(n, d);
      LinearOptions o;
      o.threads = threads;
      check({name("efficient_attention", n, threads), [=] { efficient_attention(*q, *k, *v, *out, o); },
             efficient_attention_workspace_bytes<float>(n, n, d, d, o), n > 100});
    }
  for (const Index t : {Index(1), Index(40)}) {
    const auto state = std::make_shared<LinearAttentionState<float, EluPlusOne>>(EluPlusOne{}, 64, 48);
    const auto q = std::make_shared<F>(random_matrix<float>(t, 64, 1));
    const auto v = std::make_shared<F>(random_matrix<float>(t, 48, 2));
    // The first step grows the state's scratch (counted); later steps allocate only their result.
    const int64_t first = heap::peak_during([&] { state->step(*q, *q, *v); });
    EXPECT_LE(first, state->step_workspace_bytes(t) + kSlack) << "t = " << t;
    check({"LinearAttentionState::step t=" + std::to_string(t), [=] { state->step(*q, *q, *v); },
           state->step_workspace_bytes(t), false});
  }
}

}  // namespace
}  // namespace attnkit::testing
