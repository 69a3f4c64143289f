// Linear attention next to exact attention: how close Performer gets to softmax and where linear attention becomes
// faster. How peaked linear attention's weights can be next to softmax's is examples/concentration.cpp.
//
// usage: linear_attention [max_n]     (default 8192: the crossover search doubles n up to it)
#include <attnkit/attnkit.hpp>

#include "timing.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

using attnkit::Index;
using attnkit::Matrix;

int main(int argc, char** argv) {
  const Index max_n = argc > 1 ? std::atol(argv[1]) : 8192, d = 64;

  // 1. Performer estimates softmax attention; its error falls as features are added. elu+1 is a different kernel.
  {
    const Index n = 512;
    const Matrix<double> q = Matrix<double>::Random(n, d), k = Matrix<double>::Random(n, d),
                         v = Matrix<double>::Random(n, d);
    const Matrix<double> exact = attnkit::scaled_dot_product_attention(q, k, v);
    const double scale = exact.norm();
    std::printf("1. Relative difference to exact softmax attention (n = %ld, d = %ld, double):\n", long(n), long(d));
    std::printf("   elu+1: %.3f\n", (attnkit::linear_attention(q, k, v, attnkit::EluPlusOne{}) - exact).norm() / scale);
    for (const Index m : {64, 256, 1024, 4096}) {
      attnkit::LinearOptions o;
      o.eps = 0;
      const double err =
          (attnkit::linear_attention(q, k, v, attnkit::PerformerFeatures<double>(d, m, 1), o) - exact).norm() / scale;
      std::printf("   Performer, m = %4ld orthogonal features: %.4f\n", long(m), err);
    }
  }

  // 2. The crossover: exact attention costs O(n^2 d), linear O(n d^2).
  {
    std::printf("\n2. Time per call, one thread, float, d = %ld (ms):\n", long(d));
    std::printf("   %6s %10s %10s %12s %12s\n", "n", "exact", "elu+1", "exact causal", "elu+1 causal");
    Index crossover = -1, crossover_causal = -1;
    for (Index n = 64; n <= max_n; n *= 2) {
      const Matrix<float> q = Matrix<float>::Random(n, d), k = Matrix<float>::Random(n, d),
                          v = Matrix<float>::Random(n, d);
      Matrix<float> out(n, d);
      attnkit::AttentionOptions exact;
      exact.threads = 1;
      attnkit::LinearOptions linear;
      linear.threads = 1;
      const int calls = n <= 1024 ? 20 : 3;
      double t[4];
      for (int causal = 0; causal < 2; ++causal) {
        exact.causal = linear.causal = causal != 0;
        t[2 * causal] = best_ms([&] { attnkit::scaled_dot_product_attention(q, k, v, out, exact); }, calls);
        t[2 * causal + 1] =
            best_ms([&] { attnkit::linear_attention(q, k, v, out, attnkit::EluPlusOne{}, linear); }, calls);
      }
      std::printf("   %6ld %10.3f %10.3f %12.3f %12.3f\n", long(n), t[0], t[1], t[2], t[3]);
      if (crossover < 0 && t[1] < t[0]) crossover = n;
      if (crossover_causal < 0 && t[3] < t[2]) crossover_causal = n;
    }
    std::printf("   linear (elu+1) is faster from n = %ld (non-causal) and n = %ld (causal); -1 = not up to %ld\n",
                long(crossover), long(crossover_causal), long(max_n));
  }

  return 0;
}
