// Bad input across the whole public surface, table-driven: every entry point (functions, layer constructors and
// forwards) with every class of bad argument (shape mismatches, zero sizes, out-of-range options, non-finite
// scalars, weights of the wrong shape). Each row must throw attnkit::Error whose message names the entry point and
// the argument; none may crash, assert or read out of bounds (CI also runs this under ASan and UBSan).
#include <gtest/gtest.h>

#include <attnkit/attnkit.hpp>

#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace attnkit::testing {
namespace {

using F = Matrix<float>;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

struct Row {
  const char* entry;     ///< the public name called
  const char* problem;   ///< the class of bad argument
  std::function<void()> call;
  std::vector<std::string> needles;  ///< all must appear in the message
};

F mat(Index rows, Index cols, unsigned seed = 1) { return random_matrix<float>(rows, cols, seed); }

AttentionOptions with(const std::function<void(AttentionOptions&)>& set) {
  AttentionOptions o;
  set(o);
  return o;
}

/// Bad options every softmax-attention entry point must reject, with the field each message must name.
std::vector<std::pair<AttentionOptions, std::string>> bad_options() {
  return {
      {with([](AttentionOptions& o) { o.scale = kNaN; }), "scale"},
      {with([](AttentionOptions& o) { o.scale = -1; }), "scale"},
      {with([](AttentionOptions& o) { o.window_left = -2; }), "window_left"},
      {with([](AttentionOptions& o) { o.window_right = -5; }), "window_right"},
      {with([](AttentionOptions& o) { o.key_length = 7; }), "key_length"},
      {with([](AttentionOptions& o) { o.alibi_slope = kInf; }), "alibi_slope"},
      {with([](AttentionOptions& o) { o.softcap = -3; }), "softcap"},
      {with([](AttentionOptions& o) { o.softcap = kNaN; }), "softcap"},
      {with([](AttentionOptions& o) { o.threads = -1; }), "threads"},
  };
}

std::vector<Row> attention_rows() {
  std::vector<Row> rows;
  const F q = mat(5, 4), k = mat(6, 4, 2), v = mat(6, 3, 3);
  const auto sdpa = [](const F& a, const F& b, const F& c, const AttentionOptions& o = {}) {
    scaled_dot_product_attention(a, b, c, o);
  };
  rows.push_back({"scaled_dot_product_attention", "k columns != q columns",
                  [=] { sdpa(q, mat(6, 5), v); }, {"scaled_dot_product_attention", "k", "6x5"}});
  rows.push_back({"scaled_dot_product_attention", "v rows != k rows",
                  [=] { sdpa(q, k, mat(7, 3)); }, {"scaled_dot_product_attention", "v", "7x3"}});
  rows.push_back({"scaled_dot_product_attention", "d_k = 0", [=] { sdpa(mat(5, 0), mat(6, 0), v); },
                  {"scaled_dot_product_attention", "5x0"}});
  rows.push_back({"scaled_dot_product_attention", "out of the wrong shape",
                  [=] {
                    F out(5, 2);
                    scaled_dot_product_attention(q, k, v, out);
                  },
                  {"scaled_dot_product_attention", "out", "5x2"}});
  rows.push_back({"scaled_dot_product_attention", "lse of the wrong length",
                  [=] {
                    F out(5, 3);
                    Vector<float> lse(4);
                    scaled_dot_product_attention(q, k, v, out, lse);
                  },
                  {"scaled_dot_product_attention", "lse"}});
  rows.push_back({"scaled_dot_product_attention", "bias of the wrong shape",
                  [=] { scaled_dot_product_attention(q, k, v, AttentionOptions{}, mat(5, 5)); },
                  {"scaled_dot_product_attention", "bias", "5x5"}});
  rows.push_back({"scaled_dot_product_attention", "bool mask of the wrong shape",
                  [=] { scaled_dot_product_attention(q, k, v, AttentionOptions{}, BoolMatrix::Ones(6, 6)); },
                  {"scaled_dot_product_attention", "mask", "6x6"}});
  rows.push_back({"reference::scaled_dot_product_attention", "k columns != q columns",
                  [=] { reference::scaled_dot_product_attention(q, mat(6, 5), v); }, {"k", "6x5"}});
  rows.push_back({"reference::attention_weights", "k columns != q columns",
                  [=] { reference::attention_weights(q, mat(6, 5)); }, {"k", "6x5"}});
  rows.push_back({"reference::sparse_attention", "empty pattern",
                  [=] { reference::sparse_attention(q, k, v, SparsePattern()); }, {"empty"}});
  rows.push_back({"scaled_dot_product_attention_workspace_bytes", "n < 0",
                  [] { scaled_dot_product_attention_workspace_bytes<float>(-1, 4, 4, 4); }, {"n"}});
  for (const auto& [o, field] : bad_options()) {
    rows.push_back({"scaled_dot_product_attention", "bad option", [=] { sdpa(q, k, v, o); },
                    {"scaled_dot_product_attention", field}});
    rows.push_back({"reference::scaled_dot_product_attention", "bad option",
                    [=] { reference::scaled_dot_product_attention(q, k, v, o); }, {field}});
    rows.push_back({"sparse_attention", "bad option",
                    [=] { sparse_attention(q, k, v, SparsePattern::local(2), o); }, {"sparse_attention", field}});
    rows.push_back({"MultiHeadAttention::forward", "bad option",
                    [=] {
                      MultiHeadConfig c;
                      c.width = 4, c.heads = 2;
                      MultiHeadAttention<float>(c).forward(q, o);
                    },
                    {"MultiHeadAttention", field}});
    rows.push_back({"attention_weights_from_lse", "bad option",
                    [=] { attention_weights_from_lse(q, k, Vector<float>::Zero(5), {0}, o); },
                    {"attention_weights_from_lse", field}});
  }
  // Multi-head attention on projected heads.
  rows.push_back({"multi_head_attention", "heads do not divide the columns",
                  [=] {
                    F out(5, 3);
                    multi_head_attention(q, k, v, out, 3, 3);
                  },
                  {"multi_head_attention", "3"}});
  rows.push_back({"multi_head_attention", "kv_heads do not divide heads",
                  [=] {
                    F out(5, 3);
                    multi_head_attention(mat(5, 4), mat(6, 4), mat(6, 4), out, 4, 3);
                  },
                  {"multi_head_attention", "kv_heads"}});
  rows.push_back({"multi_head_attention", "non-finite ALiBi slope",
                  [=] {
                    F out(5, 4);
                    multi_head_attention(mat(5, 4), mat(6, 4), mat(6, 4), out, 2, 2, {}, {0.5, kNaN});
                  },
                  {"multi_head_attention", "slopes"}});
  return rows;
}

std::vector<Row> layer_rows() {
  std::vector<Row> rows;
  const auto mha_config = [](const std::function<void(MultiHeadConfig&)>& set) {
    MultiHeadConfig c;
    c.width = 8, c.heads = 2;
    set(c);
    return c;
  };
  const auto mha = [&](const std::function<void(MultiHeadConfig&)>& set) {
    return [=] { MultiHeadAttention<float>(mha_config(set), 1); };
  };
  rows.push_back({"MultiHeadAttention", "width 0", mha([](MultiHeadConfig& c) { c.width = 0; }), {"width"}});
  rows.push_back({"MultiHeadAttention", "heads 0", mha([](MultiHeadConfig& c) { c.heads = 0; }), {"heads"}});
  rows.push_back({"MultiHeadAttention", "heads do not divide width", mha([](MultiHeadConfig& c) { c.heads = 3; }),
                  {"heads", "8"}});
  rows.push_back({"MultiHeadAttention", "kv_heads do not divide heads",
                  mha([](MultiHeadConfig& c) { c.heads = 4, c.kv_heads = 3; }), {"kv_heads"}});
  rows.push_back({"MultiHeadAttention", "RoPE with an odd head dimension",
                  mha([](MultiHeadConfig& c) { c.heads = 1, c.head_dim = 5, c.rope = true; }), {"RoPE"}});
  rows.push_back({"MultiHeadAttention", "output bias without projection",
                  mha([](MultiHeadConfig& c) { c.output_projection = false, c.output_bias = true; }),
                  {"output_bias"}});
  rows.push_back({"MultiHeadAttention::forward", "x of the wrong width",
                  [=] { MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {})).forward(mat(5, 7)); },
                  {"MultiHeadAttention", "5x7"}});
  rows.push_back({"MultiHeadAttention::forward", "key input of the wrong width",
                  [=] { MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {})).forward(mat(5, 8), mat(6, 9)); },
                  {"MultiHeadAttention", "6x9"}});
  rows.push_back({"MultiHeadAttention::forward", "weight w_q of the wrong shape",
                  [=] {
                    MultiHeadAttention<float> layer(mha_config([](MultiHeadConfig&) {}));
                    layer.w_q = mat(8, 7);
                    layer.forward(mat(5, 8));
                  },
                  {"w_q", "8x7"}});
  rows.push_back({"MultiHeadAttention::forward_step", "cache overflow",
                  [=] {
                    const MultiHeadAttention<float> layer(mha_config([](MultiHeadConfig&) {}));
                    KVCache<float> cache = layer.make_cache(4);
                    layer.forward_step(mat(5, 8), cache);
                  },
                  {"KVCache", "capacity 4"}});
  rows.push_back({"MultiHeadAttention::forward_step", "cache of another layer",
                  [=] {
                    const MultiHeadAttention<float> layer(mha_config([](MultiHeadConfig&) {}));
                    KVCache<float> cache(16, 6);
                    layer.forward_step(mat(1, 8), cache);
                  },
                  {"forward_step", "cache"}});
  rows.push_back({"multi_head_attention_workspace_bytes",
                  "H % H_kv != 0",
                  [] { multi_head_attention_workspace_bytes<float>(5, 6, 4, 3, 8, 8); },
                  {"multi_head_attention_workspace_bytes", "H = 4", "H_kv = 3"}});
  rows.push_back({"MultiHeadAttention::workspace_bytes",
                  "m < -1",
                  [=] { MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {})).workspace_bytes(5, -2); },
                  {"MultiHeadAttention::workspace_bytes", "m = -2"}});
  rows.push_back({"MultiHeadAttention::workspace_bytes",
                  "bad option",
                  [=] {
                    MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {
                    })).workspace_bytes(5, 5, with([](AttentionOptions& o) { o.softcap = -1; }));
                  },
                  {"MultiHeadAttention::workspace_bytes", "softcap"}});
  rows.push_back({"MultiHeadAttention::step_workspace_bytes",
                  "cached < 0",
                  [=] { MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {})).step_workspace_bytes(1, -4); },
                  {"MultiHeadAttention::step_workspace_bytes", "cached"}});
  rows.push_back({"MultiHeadAttention::forward_into", "out of the wrong shape",
                  [=] {
                    F out(5, 7);
                    MultiHeadAttention<float>(mha_config([](MultiHeadConfig&) {})).forward_into(mat(5, 8), out);
                  },
                  {"MultiHeadAttention", "out", "5x7"}});
  rows.push_back({"KVCache", "capacity 0", [] { KVCache<float>(0, 4); }, {"KVCache", "capacity"}});
  rows.push_back({"KVCache", "kv_width not a multiple of kv_heads", [] { KVCache<float>(8, 6, 4); },
                  {"KVCache", "6", "4"}});
  rows.push_back({"MultiHeadAttention::forward_step", "cache of the layer's width but not its heads",
                  [=] {
                    const MultiHeadAttention<float> layer(mha_config([](MultiHeadConfig&) {}));
                    KVCache<float> cache(16, 8, 1);
                    layer.forward_step(mat(1, 8), cache);
                  },
                  {"forward_step", "1 heads", "H_kv = 2"}});
  rows.push_back({"KVCache::truncate", "size beyond the cached tokens",
                  [] {
                    KVCache<float> cache(8, 4);
                    cache.truncate(3);
                  },
                  {"KVCache::truncate", "size"}});
  // Positions.
  rows.push_back({"alibi_slopes", "0 heads", [] { alibi_slopes(0); }, {"alibi_slopes"}});
  rows.push_back({"sinusoidal_position_encoding", "negative length",
                  [] { sinusoidal_position_encoding<float>(-1, 8); }, {"sinusoidal_position_encoding"}});
  rows.push_back({"apply_rope", "odd head dimension",
                  [] {
                    F x = mat(3, 5);
                    apply_rope<float>(x, 0);
                  },
                  {"apply_rope", "3x5"}});
  rows.push_back({"apply_rope", "base <= 1",
                  [] {
                    F x = mat(3, 4);
                    RopeOptions o;
                    o.base = 1;
                    apply_rope<float>(x, 0, o);
                  },
                  {"apply_rope", "base"}});
  rows.push_back({"apply_rope", "negative first position",
                  [] {
                    F x = mat(3, 4);
                    apply_rope<float>(x, -1);
                  },
                  {"apply_rope", "first"}});
  // Synthesizers.
  const auto synth_config = [](const std::function<void(SynthesizerConfig&)>& set) {
    SynthesizerConfig c;
    c.width = 8, c.max_length = 12, c.heads = 2, c.a = 3, c.b = 4, c.k = 2;
    set(c);
    return c;
  };
  rows.push_back({"DenseSynthesizer", "width 0",
                  [=] { DenseSynthesizer<float>(synth_config([](SynthesizerConfig& c) { c.width = 0; })); },
                  {"width"}});
  rows.push_back({"RandomSynthesizer", "max_length 0",
                  [=] { RandomSynthesizer<float>(synth_config([](SynthesizerConfig& c) { c.max_length = 0; })); },
                  {"max_length"}});
  rows.push_back({"DenseSynthesizer", "heads do not divide width",
                  [=] { DenseSynthesizer<float>(synth_config([](SynthesizerConfig& c) { c.heads = 3; })); },
                  {"heads"}});
  rows.push_back({"FactorizedDenseSynthesizer", "a * b != l",
                  [=] { FactorizedDenseSynthesizer<float>(synth_config([](SynthesizerConfig& c) { c.b = 5; })); },
                  {"a", "b"}});
  rows.push_back({"FactorizedRandomSynthesizer", "k < 1",
                  [=] { FactorizedRandomSynthesizer<float>(synth_config([](SynthesizerConfig& c) { c.k = 0; })); },
                  {"k"}});
  rows.push_back({"MixtureSynthesizer", "no components",
                  [=] { MixtureSynthesizer<float>(synth_config([](SynthesizerConfig&) {}), {}); },
                  {"MixtureSynthesizer", "component"}});
  rows.push_back({"MixtureSynthesizer", "duplicate component",
                  [=] {
                    MixtureSynthesizer<float>(synth_config([](SynthesizerConfig&) {}),
                                              {SynthesizerKind::kRandom, SynthesizerKind::kRandom});
                  },
                  {"MixtureSynthesizer", "more than once"}});
  rows.push_back({"MixtureSynthesizer::forward", "non-finite mixture logits",
                  [=] {
                    MixtureSynthesizer<float> layer(synth_config([](SynthesizerConfig&) {}),
                                                    {SynthesizerKind::kRandom, SynthesizerKind::kDense});
                    layer.mixture_logits(0, 1) = float(kNaN);
                    layer.forward(mat(5, 8));
                  },
                  {"mixture_logits"}});
  rows.push_back({"DenseSynthesizer::forward", "n > max_length",
                  [=] { DenseSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).forward(mat(13, 8)); },
                  {"13", "12"}});
  rows.push_back({"RandomSynthesizer::forward", "x of the wrong width",
                  [=] { RandomSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).forward(mat(5, 6)); },
                  {"5x6"}});
  rows.push_back({"RandomSynthesizer::forward", "scale without dot-product logits",
                  [=] {
                    AttentionOptions o;
                    o.scale = 0.5;
                    RandomSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).forward(mat(5, 8), o);
                  },
                  {"scale"}});
  rows.push_back({"DenseSynthesizer::forward", "weight w2 of the wrong shape",
                  [=] {
                    DenseSynthesizer<float> layer(synth_config([](SynthesizerConfig&) {}));
                    layer.w2 = mat(3, 3);
                    layer.forward(mat(5, 8));
                  },
                  {"w2", "3x3"}});
  rows.push_back({"FactorizedDenseSynthesizer::forward_into", "out of the wrong shape",
                  [=] {
                    F out(5, 9);
                    FactorizedDenseSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).forward_into(mat(5, 8), out);
                  },
                  {"out", "5x9"}});
  rows.push_back({"FactorizedRandomSynthesizer::attention_weights", "n > max_length",
                  [=] {
                    FactorizedRandomSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).attention_weights(mat(20, 8));
                  },
                  {"20", "12"}});
  rows.push_back({"Synthesizer::workspace_bytes",
                  "n > max_length",
                  [=] { DenseSynthesizer<float>(synth_config([](SynthesizerConfig&) {})).workspace_bytes(13); },
                  {"Synthesizer::workspace_bytes", "13", "12"}});
  rows.push_back({"Synthesizer::workspace_bytes",
                  "bad option",
                  [=] {
                    RandomSynthesizer<float>(synth_config([](SynthesizerConfig&) {
                    })).workspace_bytes(5, with([](AttentionOptions& o) { o.threads = -2; }));
                  },
                  {"Synthesizer::workspace_bytes", "threads"}});
  // GAU and FLASH.
  const auto gau_config = [](const std::function<void(GauConfig&)>& set) {
    GauConfig c;
    c.width = 8, c.shared = 4, c.chunk = 4;
    set(c);
    return c;
  };
  rows.push_back({"GatedAttentionUnit", "width 0",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig& c) { c.width = 0; })); }, {"width"}});
  rows.push_back({"GatedAttentionUnit", "shared 0",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig& c) { c.shared = 0; })); }, {"s"}});
  rows.push_back({"GatedAttentionUnit", "odd s with RoPE",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig& c) { c.shared = 5, c.rope = true; })); },
                  {"RoPE"}});
  rows.push_back({"GatedAttentionUnit", "init_std not finite",
                  [=] {
                    GatedAttentionUnit<float>(
                        gau_config([](GauConfig& c) { c.init = GauInit::kNormal, c.init_std = kInf; }));
                  },
                  {"init_std"}});
  rows.push_back({"GatedAttentionUnit::forward", "x of the wrong width",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).forward(mat(5, 9)); }, {"5x9"}});
  rows.push_back({"GatedAttentionUnit::forward", "key_length > n",
                  [=] {
                    GauOptions o;
                    o.key_length = 6;
                    GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).forward(mat(5, 8), o);
                  },
                  {"key_length"}});
  rows.push_back({"GatedAttentionUnit::forward", "weight w_u of the wrong shape",
                  [=] {
                    GatedAttentionUnit<float> layer(gau_config([](GauConfig&) {}));
                    layer.w_u = mat(8, 3);
                    layer.forward(mat(5, 8));
                  },
                  {"w_u", "8x3"}});
  rows.push_back({"FlashAttentionLayer", "chunk 0",
                  [=] { FlashAttentionLayer<float>(gau_config([](GauConfig& c) { c.chunk = 0; })); }, {"chunk"}});
  rows.push_back({"FlashAttentionLayer", "RoPE",
                  [=] { FlashAttentionLayer<float>(gau_config([](GauConfig& c) { c.rope = true; })); }, {"rope"}});
  rows.push_back({"FlashAttentionLayer::forward", "x of the wrong width",
                  [=] { FlashAttentionLayer<float>(gau_config([](GauConfig&) {})).forward(mat(5, 9)); }, {"5x9"}});
  rows.push_back({"GatedAttentionUnit::attention_weights", "x of the wrong width",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).attention_weights(mat(5, 9)); },
                  {"5x9"}});
  rows.push_back({"GatedAttentionUnit::forward_with_attention", "A of the wrong shape",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).forward_with_attention(mat(5, 8), mat(5, 4)); },
                  {"forward_with_attention", "5x4"}});
  rows.push_back({"FlashAttentionLayer::attention_parts", "x of the wrong width",
                  [=] { FlashAttentionLayer<float>(gau_config([](GauConfig&) {})).attention_parts(mat(5, 9)); },
                  {"5x9"}});
  rows.push_back({"FlashAttentionLayer::forward", "key padding (GAU only)",
                  [=] {
                    GauOptions o;
                    o.key_length = 3;
                    FlashAttentionLayer<float>(gau_config([](GauConfig&) {})).forward(mat(5, 8), o);
                  },
                  {"key_length"}});
  rows.push_back({"GatedAttentionUnit::workspace_bytes",
                  "n < 0",
                  [=] { GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).workspace_bytes(-1); },
                  {"GatedAttentionUnit::workspace_bytes", "n"}});
  rows.push_back({"GatedAttentionUnit::workspace_bytes",
                  "key_length > n",
                  [=] {
                    GauOptions o;
                    o.key_length = 9;
                    GatedAttentionUnit<float>(gau_config([](GauConfig&) {})).workspace_bytes(5, o);
                  },
                  {"GatedAttentionUnit::workspace_bytes", "key_length"}});
  rows.push_back({"FlashAttentionLayer::workspace_bytes",
                  "threads < 0",
                  [=] {
                    GauOptions o;
                    o.threads = -1;
                    FlashAttentionLayer<float>(gau_config([](GauConfig&) {})).workspace_bytes(5, o);
                  },
                  {"FlashAttentionLayer::workspace_bytes", "threads"}});
  return rows;
}

std::vector<Row> family_rows() {
  std::vector<Row> rows;
  const F q = mat(5, 4), k = mat(6, 4, 2), v = mat(6, 3, 3);
  // Sparse patterns and attention.
  rows.push_back({"SparsePattern::local", "w < 0", [] { SparsePattern::local(-1); }, {"local", "w"}});
  rows.push_back({"SparsePattern::atrous", "k < 1", [] { SparsePattern::atrous(0); }, {"atrous", "k"}});
  rows.push_back({"SparsePattern::local_atrous", "k < 1", [] { SparsePattern::local_atrous(0); }, {"local_atrous"}});
  rows.push_back({"SparsePattern::strided", "l < 1", [] { SparsePattern::strided(0); }, {"strided"}});
  rows.push_back({"SparsePattern::fixed", "c > l", [] { SparsePattern::fixed(4, 5); }, {"fixed", "c"}});
  rows.push_back({"SparsePattern::block", "block size 0",
                  [] { SparsePattern::block(BoolMatrix::Ones(2, 2), 0); }, {"block"}});
  rows.push_back({"sparse_attention", "empty pattern", [=] { sparse_attention(q, k, v, SparsePattern()); },
                  {"sparse_attention", "empty"}});
  rows.push_back({"sparse_attention", "block layout of the wrong shape",
                  [=] { sparse_attention(q, k, v, SparsePattern::block(BoolMatrix::Ones(2, 3), 2)); },
                  {"sparse_attention", "2x3", "3x3"}});
  rows.push_back({"sparse_attention", "v rows != k rows",
                  [=] { sparse_attention(q, k, mat(4, 3), SparsePattern::local(1)); }, {"sparse_attention", "4x3"}});
  rows.push_back({"SparsePattern::mask", "negative size", [] { SparsePattern::local(2).mask(-3, 4); },
                  {"SparsePattern::mask", "-3"}});
  rows.push_back({"SparsePattern::keys", "query out of range", [] { SparsePattern::local(2).keys(9, 5, 5); },
                  {"SparsePattern::keys", "9"}});
  rows.push_back({"SparsePattern::allows", "bad option",
                  [] { SparsePattern::local(2).allows(1, 1, 5, 5, with([](AttentionOptions& o) { o.key_length = 9; })); },
                  {"SparsePattern::allows", "key_length"}});
  rows.push_back({"sparse_attention_workspace_bytes", "empty pattern",
                  [] { sparse_attention_workspace_bytes<float>(5, 6, 4, 3, SparsePattern()); }, {"empty"}});
  // Linear attention.
  const auto linear_with = [](const std::function<void(LinearOptions&)>& set) {
    LinearOptions o;
    set(o);
    return o;
  };
  rows.push_back({"linear_attention", "k columns != q columns",
                  [=] { linear_attention(q, mat(6, 5), v, EluPlusOne{}); }, {"linear_attention", "6x5"}});
  rows.push_back({"linear_attention", "causal with n != m",
                  [=] { linear_attention(q, k, v, EluPlusOne{}, linear_with([](LinearOptions& o) { o.causal = true; })); },
                  {"linear_attention", "causal"}});
  rows.push_back({"linear_attention", "chunk < 0",
                  [=] { linear_attention(q, k, v, Relu{}, linear_with([](LinearOptions& o) { o.chunk = -1; })); },
                  {"linear_attention", "chunk"}});
  rows.push_back({"linear_attention", "eps not finite",
                  [=] { linear_attention(q, k, v, Taylor{}, linear_with([](LinearOptions& o) { o.eps = kNaN; })); },
                  {"linear_attention", "eps"}});
  rows.push_back({"linear_attention", "threads < 0",
                  [=] { linear_attention(q, k, v, Taylor{}, linear_with([](LinearOptions& o) { o.threads = -1; })); },
                  {"linear_attention", "threads"}});
  rows.push_back({"linear_attention", "out of the wrong shape",
                  [=] {
                    F out(5, 4);
                    linear_attention(q, k, v, out, EluPlusOne{});
                  },
                  {"linear_attention", "out", "5x4"}});
  rows.push_back({"PerformerFeatures", "d < 1", [] { PerformerFeatures<float>(0, 8); }, {"PerformerFeatures", "d"}});
  rows.push_back({"PerformerFeatures", "0 features", [] { PerformerFeatures<float>(4, 0); }, {"PerformerFeatures"}});
  rows.push_back({"linear_attention", "Performer built for another d",
                  [=] { linear_attention(q, k, v, PerformerFeatures<float>(6, 8)); }, {"PerformerFeatures", "6"}});
  rows.push_back({"efficient_attention", "v rows != k rows",
                  [=] { efficient_attention(q, k, mat(4, 3)); }, {"efficient_attention", "4x3"}});
  rows.push_back({"LinearAttentionState", "d < 1",
                  [] { LinearAttentionState<float, EluPlusOne>(EluPlusOne{}, 0, 3); }, {"LinearAttentionState", "d"}});
  rows.push_back({"LinearAttentionState::step", "block of the wrong width",
                  [=] {
                    LinearAttentionState<float, EluPlusOne> s(EluPlusOne{}, 4, 3);
                    s.step(mat(2, 4), mat(2, 5), mat(2, 3));
                  },
                  {"LinearAttentionState::step", "2x5"}});
  rows.push_back({"linear_attention_workspace_bytes", "chunk < 0",
                  [=] {
                    linear_attention_workspace_bytes<float>(5, 6, 4, 3, EluPlusOne{},
                                                            linear_with([](LinearOptions& o) { o.chunk = -2; }));
                  },
                  {"chunk"}});
  rows.push_back({"efficient_attention_workspace_bytes",
                  "causal",
                  [=] {
                    efficient_attention_workspace_bytes<float>(5, 6, 4, 3,
                                                               linear_with([](LinearOptions& o) { o.causal = true; }));
                  },
                  {"efficient_attention_workspace_bytes", "causal"}});
  rows.push_back({"efficient_attention_workspace_bytes",
                  "m < 0",
                  [=] { efficient_attention_workspace_bytes<float>(5, -6, 4, 3); },
                  {"efficient_attention_workspace_bytes", "m = -6"}});
  rows.push_back({"LinearAttentionState::step_workspace_bytes",
                  "t < 0",
                  [=] { LinearAttentionState<float, EluPlusOne>(EluPlusOne{}, 4, 3).step_workspace_bytes(-1); },
                  {"LinearAttentionState::step_workspace_bytes", "t"}});
  // Analysis.
  rows.push_back({"row_entropy", "negative weight", [] { row_entropy(F::Constant(2, 2, -0.5f)); }, {"row_entropy"}});
  rows.push_back({"row_entropy", "NaN weight", [] { row_entropy(F::Constant(2, 2, float(kNaN))); }, {"row_entropy"}});
  rows.push_back({"max_attainable_weight", "n = 0", [] { max_attainable_weight(0, 1); }, {"max_attainable_weight", "n"}});
  rows.push_back({"max_attainable_weight", "bound not finite", [] { max_attainable_weight(4, kInf); },
                  {"max_attainable_weight", "bound"}});
  rows.push_back({"attention_weights_from_lse", "lse of the wrong length",
                  [=] { attention_weights_from_lse(q, k, Vector<float>::Zero(4), {0}); },
                  {"attention_weights_from_lse", "lse"}});
  rows.push_back({"attention_weights_from_lse", "row out of range",
                  [=] { attention_weights_from_lse(q, k, Vector<float>::Zero(5), {5}); },
                  {"attention_weights_from_lse", "row 5"}});
  rows.push_back({"impact_matrix", "mask embedding of the wrong shape",
                  [=] { impact_matrix([](const F& x) { return x; }, q, mat(1, 3)); }, {"impact_matrix", "1x3"}});
  rows.push_back({"impact_matrix", "encoder returns the wrong number of rows",
                  [=] { impact_matrix([](const F& x) { return F(x.topRows(2)); }, q, mat(1, 4)); },
                  {"impact_matrix", "encoder"}});
  rows.push_back({"segment", "impact not square", [] { segment(Matrix<double>::Zero(3, 4), 0.5); },
                  {"segment", "3x4"}});
  rows.push_back({"bracketed", "fewer token names than the tree's tokens",
                  [] { bracketed(parse_tree(Matrix<double>::Zero(4, 4)), {"a", "b"}); }, {"bracketed", "4", "2"}});
  rows.push_back({"segment", "NaN threshold", [] { segment(Matrix<double>::Zero(3, 3), double(kNaN)); },
                  {"segment", "threshold"}});
  rows.push_back({"parse_tree", "impact not square", [] { parse_tree(Matrix<double>::Zero(4, 3)); },
                  {"parse_tree", "4x3"}});
  return rows;
}

void run_table(const std::vector<Row>& rows) {
  for (const Row& row : rows) {
    SCOPED_TRACE(std::string(row.entry) + ": " + row.problem);
    try {
      row.call();
      ADD_FAILURE() << "no attnkit::Error thrown";
    } catch (const Error& e) {
      const std::string what = e.what();
      for (const std::string& needle : row.needles)
        EXPECT_NE(what.find(needle), std::string::npos) << "message does not mention \"" << needle << "\": " << what;
    }
  }
}

TEST(BadInput, SoftmaxAttentionEntryPoints) { run_table(attention_rows()); }
TEST(BadInput, LayerConstructorsAndForwards) { run_table(layer_rows()); }
TEST(BadInput, SparseLinearAndAnalysis) { run_table(family_rows()); }

TEST(BadInput, TheTableCoversEveryFamily) {
  // A guard against the table shrinking: the number of distinct entry points it calls.
  std::vector<std::string> entries;
  for (const auto& table : {attention_rows(), layer_rows(), family_rows()})
    for (const Row& row : table)
      if (std::find(entries.begin(), entries.end(), row.entry) == entries.end()) entries.push_back(row.entry);
  EXPECT_GE(entries.size(), 50u) << entries.size() << " entry points";
  std::printf("  %zu entry points, %zu rows\n", entries.size(), attention_rows().size() + layer_rows().size() + family_rows().size());
}

}  // namespace
}  // namespace attnkit::testing
