// A pre-norm transformer block built from attnkit: RMSNorm -> multi-head attention with RoPE -> residual, then
// RMSNorm -> SwiGLU feed-forward -> residual. It encodes a random sequence, then runs a toy language model (one
// block, tied embeddings) greedily, decoding token by token with the KV cache and printing each token's latency.
// Finally it checks that the cached decoding gave the logits of one full causal forward over the same tokens.
#include <attnkit/attnkit.hpp>

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

using attnkit::Index;
using attnkit::Matrix;

namespace {

Matrix<float> gaussian(Index rows, Index cols, double stddev, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.f, float(stddev));
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

// RMSNorm (Zhang & Sennrich 2019): x / rms(x) * gain, row by row.
Matrix<float> rms_norm(const Matrix<float>& x, const Eigen::RowVectorXf& gain) {
  Matrix<float> y(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i)
    y.row(i) = x.row(i) / std::sqrt(x.row(i).squaredNorm() / float(x.cols()) + 1e-6f) * gain.asDiagonal();
  return y;
}

// SwiGLU feed-forward (Shazeer 2020): (silu(x W_1) .* (x W_3)) W_2.
struct SwiGlu {
  Matrix<float> w1, w3, w2;
  Matrix<float> operator()(const Matrix<float>& x) const {
    const Matrix<float> a = x * w1, b = x * w3;
    const Matrix<float> gated = (a.array() / (1.0f + (-a.array()).exp()) * b.array()).matrix();
    return gated * w2;
  }
};

struct Block {
  Eigen::RowVectorXf norm1, norm2;
  attnkit::MultiHeadAttention<float> attention;
  SwiGlu ffn;

  // Whole sequence at once (causal).
  Matrix<float> forward(const Matrix<float>& x) const {
    attnkit::AttentionOptions causal;
    causal.causal = true;
    const Matrix<float> h = x + attention.forward(rms_norm(x, norm1), causal);
    return h + ffn(rms_norm(h, norm2));
  }
  // New tokens only, attending over the cache.
  Matrix<float> step(const Matrix<float>& x, attnkit::KVCache<float>& cache) const {
    const Matrix<float> h = x + attention.forward_step(rms_norm(x, norm1), cache);
    return h + ffn(rms_norm(h, norm2));
  }
};

}  // namespace

int main() {
  const Index width = 256, heads = 8, kv_heads = 2, hidden = 4 * width, vocab = 512, prompt = 48, generate = 32;
  std::mt19937 gen(7);

  attnkit::MultiHeadConfig config;
  config.width = width, config.heads = heads, config.kv_heads = kv_heads, config.rope = true;
  const Block block{Eigen::RowVectorXf::Ones(width), Eigen::RowVectorXf::Ones(width),
                    attnkit::MultiHeadAttention<float>(config, 1),
                    SwiGlu{gaussian(width, hidden, 0.05, gen), gaussian(width, hidden, 0.05, gen),
                           gaussian(hidden, width, 0.05, gen)}};

  // 1. Encode a random sequence with the block.
  const Matrix<float> x = gaussian(100, width, 1.0, gen);
  const Matrix<float> y = block.forward(x);
  std::printf("encoder block: %ldx%ld -> %ldx%ld, output RMS %.3f\n", long(x.rows()), long(x.cols()), long(y.rows()),
              long(y.cols()), std::sqrt(y.squaredNorm() / double(y.size())));

  // 2. Greedy decoding with a toy language model: embed, one block, final norm, output head.
  const Matrix<float> embedding = gaussian(vocab, width, 1.0, gen), head = gaussian(width, vocab, 0.1, gen);
  const Eigen::RowVectorXf final_norm = Eigen::RowVectorXf::Ones(width);
  const auto embed = [&](const std::vector<Index>& tokens) {
    Matrix<float> e(Index(tokens.size()), width);
    for (size_t t = 0; t < tokens.size(); ++t) e.row(Index(t)) = embedding.row(tokens[t]);
    return e;
  };
  const auto logits = [&](const Matrix<float>& h) -> Matrix<float> { return rms_norm(h, final_norm) * head; };

  std::vector<Index> tokens(prompt);
  for (Index& t : tokens) t = Index(gen() % vocab);
  attnkit::KVCache<float> cache = block.attention.make_cache(prompt + generate);
  auto t0 = std::chrono::steady_clock::now();
  Matrix<float> last = logits(block.step(embed(tokens), cache).bottomRows(1));  // prefill the prompt
  std::printf("prefill of %ld tokens: %.2f ms\n", long(prompt),
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  std::printf("decoding:");
  for (Index step = 0; step < generate; ++step) {
    Index next;
    last.row(0).maxCoeff(&next);
    tokens.push_back(next);
    t0 = std::chrono::steady_clock::now();
    last = logits(block.step(embed({next}), cache));
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    std::printf(" %ld(%.0fus)", long(next), us);
  }
  std::printf("\n");

  // 3. The cached decoding must equal one causal forward over every token fed so far.
  const Matrix<float> full = logits(block.forward(embed(tokens)).bottomRows(1));
  const float error = (full - last).cwiseAbs().maxCoeff() / full.cwiseAbs().maxCoeff();
  std::printf("cache of %ld tokens; relative max |cached - full| of the last logits: %.2e\n", long(cache.size()),
              error);
  return error < 1e-4f ? 0 : 1;  // float rounding differs between the two paths; anything larger is a bug
}
