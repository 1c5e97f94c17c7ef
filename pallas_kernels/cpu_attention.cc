// Ragged paged attention, native on the CPU (an XLA FFI custom call).
//
// Why native: in `jax.numpy` every row has to gather its pages into a contiguous copy before the
// matmuls can read them, decode rows are bound by those gathers (about 4 GB/s against the 9 GB/s
// a stream reaches here), and prefill rows pay for whole query-by-key tiles on the causal edge.
// Here each work item walks its pages in place, one `page_size x head_dim` block of K and of V at
// a time, with a streaming softmax: cache bytes are read once and never copied, and every query
// row scores exactly the keys its causal (and sliding-window) span allows.
//
// Layout (the reference backend's): cache[2][Hkv][num_pages][page_size][D], K at 0 and V at 1.
// Work item = (row, KV head, a tile of up to kTileTokens of the row's new tokens); the G query
// heads of that KV head share every K/V load. A decode row (one new token) is instead cut by
// context, kSplitTokens per item, and its items' partial softmaxes are merged at the end, so one
// long decode row still spreads over the threads. Items run on XLA's intra-op thread pool, or on
// the calling thread alone when there is little work (waking the pool takes ~0.1 ms).
// Tokens past the last row's come out as zeros.
//
// Cache element types: float32, bfloat16 and float8 e4m3fn (the fp8 KV cache, stored as its uint8
// bytes or as F8E4M3FN: one byte per value, decoded here through a 256-entry table; its per-tensor scales are applied by the caller, folded
// into sm_scale for K and into the output for V). All math is float32.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileTokens = 16;    // new tokens per prefill work item
constexpr int kSplitTokens = 256;  // context tokens per decode work item (rounded to whole pages)
constexpr int64_t kInlineWork = 16384;  // query-head x key pairs below which one thread runs a call (~0.1 ms)
constexpr float kMasked = -1e30f;

inline float load(float x) { return x; }
inline float load(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
// (m / 8 * 2^-6), S.1111.111 is NaN and there is no infinity (the largest finite value is 448).
std::array<float, 256> e4m3fn_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 0xF, m = b & 0x7;
    float v = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.f + m / 8.f, e - 7);
    if (e == 0xF && m == 0x7) v = std::nanf("");
    t[b] = (b & 0x80) ? -v : v;
  }
  return t;
}
const std::array<float, 256> kE4M3 = e4m3fn_table();
inline float load(uint8_t e4m3) { return kE4M3[e4m3]; }

// exp(x) for x <= 0 (softmax arguments), to about 1 ulp, in plain arithmetic so loops over it
// vectorize (std::exp stays a scalar libm call and was most of a prefill tile's time): Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-7 Taylor series for e^r (truncation error
// below 1e-8 relative). Arguments under -87 (masked scores among them) return exactly 0.
inline float exp_neg(float arg) {
  const float x = std::max(arg, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return arg < -87.0f ? 0.f : e * scale;
}

struct Item {
  int row, head;
  int q0, nq;    // new tokens [q0, q0 + nq) of the row
  int lo, hi;    // decode split items: context [lo, hi); tiles: -1, -1 (from the causal span)
  int partial;   // decode split items: their slot in the partial buffer; else -1 (write the output)
  int cost;      // about how many (query, key) pairs it scores, to start the big ones first
};

struct Problem {
  const float* q;  // [T, Hq, D]
  const void* cache;
  const int32_t* block_tables;  // [S, max_pages]
  const int32_t* seq_lens;
  const int32_t* q_lens;
  const int32_t* query_start_loc;
  float* out;  // [T, Hq, D]
  int tokens, hkv, group, d, num_pages, page_size, max_pages, window;
  float sm_scale, soft_cap;  // window <= 0, soft_cap <= 0: none
};

// What an item reads: its KV head's K and V page arrays, its row's block table, and where its
// tokens sit (first query position in the sequence, first token in q/out).
template <typename T>
struct ItemView {
  const T* k_head;
  const T* v_head;
  const int32_t* pages;
  int len, first_pos, token0;

  ItemView(const Problem& pb, const Item& it) {
    const T* cache = static_cast<const T*>(pb.cache);
    const size_t head_stride = static_cast<size_t>(pb.num_pages) * pb.page_size * pb.d;
    k_head = cache + static_cast<size_t>(it.head) * head_stride;
    v_head = cache + (static_cast<size_t>(pb.hkv) + it.head) * head_stride;
    pages = pb.block_tables + static_cast<size_t>(it.row) * pb.max_pages;
    len = std::min(pb.seq_lens[it.row], pb.max_pages * pb.page_size);
    first_pos = len - pb.q_lens[it.row] + it.q0;
    token0 = pb.query_start_loc[it.row] + it.q0;
  }
};

// Streaming softmax of one item over its pages. Per query row r = i * G + g (token i, head g):
// m[r], l[r] and the unnormalised acc[r][D]; rows whose span is empty keep m = kMasked, l = 0.
template <typename T, int kD>
void run_item(const Problem& pb, const Item& it, float* m, float* l, float* acc, float* scores) {
  const int D = kD > 0 ? kD : pb.d;
  const int G = pb.group, ps = pb.page_size, Hq = pb.hkv * G, R = it.nq * G;
  const ItemView<T> view(pb, it);
  const T *k_head = view.k_head, *v_head = view.v_head;
  const int32_t* pages = view.pages;
  const int len = view.len, first_pos = view.first_pos, token0 = view.token0;

  // Key span of the whole tile, then of each token i: [lo_i, hi_i) = [pos - window + 1, pos + 1).
  int lo = it.lo, hi = it.hi;
  if (lo < 0) {
    hi = std::min(first_pos + it.nq, len);
    lo = pb.window > 0 ? std::max(first_pos - pb.window + 1, 0) : 0;
  }
  for (int r = 0; r < R; ++r) {
    m[r] = kMasked;
    l[r] = 0.f;
  }
  std::fill(acc, acc + static_cast<size_t>(R) * D, 0.f);

  // bfloat16 / fp8 pages are decoded to float32 once per page, not once per query head that reads them
  thread_local std::vector<float> k_buf, v_buf;
  if constexpr (!std::is_same<T, float>::value) {
    k_buf.resize(static_cast<size_t>(ps) * D);
    v_buf.resize(static_cast<size_t>(ps) * D);
  }
  for (int p = lo / ps; p * ps < hi; ++p) {
    const int page = std::min(std::max(pages[p], 0), pb.num_pages - 1);  // clamped like an XLA gather
    const size_t base = static_cast<size_t>(page) * ps * D;
    const float* k;
    const float* v;
    if constexpr (std::is_same<T, float>::value) {
      k = k_head + base;
      v = v_head + base;
    } else {
      for (int x = 0; x < ps * D; ++x) k_buf[x] = load(k_head[base + x]);
      for (int x = 0; x < ps * D; ++x) v_buf[x] = load(v_head[base + x]);
      k = k_buf.data();
      v = v_buf.data();
    }
    const int page_lo = std::max(lo - p * ps, 0), page_hi = std::min(hi - p * ps, ps);
    for (int i = 0; i < it.nq; ++i) {
      const int pos = first_pos + i;
      // This token's keys within the page: j in [ja, jb).
      const int ja = std::max(page_lo, pb.window > 0 && it.lo < 0 ? pos - pb.window + 1 - p * ps : page_lo);
      const int jb = std::min(page_hi, it.lo < 0 ? pos + 1 - p * ps : page_hi);
      if (ja >= jb) continue;
      for (int g = 0; g < G; ++g) {
        const int r = i * G + g;
        const float* qr = pb.q + (static_cast<size_t>(token0 + i) * Hq + static_cast<size_t>(it.head) * G + g) * D;
        float* s = scores + static_cast<size_t>(r) * ps;
        float mx = m[r];
        for (int j = ja; j < jb; ++j) {
          const float* kj = k + static_cast<size_t>(j) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int x = 0; x < D; ++x) dot += qr[x] * kj[x];
          float sc = dot * pb.sm_scale;
          if (pb.soft_cap > 0.f) sc = pb.soft_cap * std::tanh(sc / pb.soft_cap);
          s[j] = sc;
          mx = std::max(mx, sc);
        }
        const float alpha = exp_neg(m[r] - mx);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = ja; j < jb; ++j) {
          s[j] = exp_neg(s[j] - mx);
          sum += s[j];
        }
        m[r] = mx;
        l[r] = l[r] * alpha + sum;
        float* ar = acc + static_cast<size_t>(r) * D;
        if (alpha != 1.f) {
#pragma omp simd
          for (int x = 0; x < D; ++x) ar[x] *= alpha;
        }
        for (int j = ja; j < jb; ++j) {
          const float* vj = v + static_cast<size_t>(j) * D;
          const float pj = s[j];
#pragma omp simd
          for (int x = 0; x < D; ++x) ar[x] += pj * vj[x];
        }
      }
    }
  }
}

// The same for a tile of several new tokens (prefill), with page_size and head_dim fixed at compile
// time: each page's K is transposed once to [D][page_size] so four query rows at a time score all
// its keys with broadcast FMAs (no horizontal sums), and pairs of rows share each V row's loads.
// Keys outside a token's causal/window span get probability 0.
template <typename T, int kD, int kPS>
void run_tile(const Problem& pb, const Item& it, float* m, float* l, float* acc, float* scores) {
  constexpr int kRowBlock = 4;
  const int G = pb.group, Hq = pb.hkv * G, R = it.nq * G;
  const ItemView<T> view(pb, it);
  const T *k_head = view.k_head, *v_head = view.v_head;
  const int32_t* pages = view.pages;
  const int len = view.len, first_pos = view.first_pos, token0 = view.token0;
  const int hi = std::min(first_pos + it.nq, len);
  const int lo = pb.window > 0 ? std::max(first_pos - pb.window + 1, 0) : 0;

  alignas(32) float kt[kD * kPS];
  alignas(32) float vf[std::is_same<T, float>::value ? 1 : kPS * kD];
  alignas(32) static const float zeros[kD] = {};
  for (int r = 0; r < R; ++r) {
    m[r] = kMasked;
    l[r] = 0.f;
  }
  std::fill(acc, acc + static_cast<size_t>(R) * kD, 0.f);
  auto q_row = [&](int r) -> const float* {
    if (r >= R) return zeros;
    return pb.q + (static_cast<size_t>(token0 + r / G) * Hq + static_cast<size_t>(it.head) * G + r % G) * kD;
  };

  for (int p = lo / kPS; p * kPS < hi; ++p) {
    const int page = std::min(std::max(pages[p], 0), pb.num_pages - 1);
    const size_t base = static_cast<size_t>(page) * kPS * kD;
    const T* k = k_head + base;
    for (int j = 0; j < kPS; ++j) {
      for (int x = 0; x < kD; ++x) kt[x * kPS + j] = load(k[j * kD + x]);
    }
    const float* v;
    if constexpr (std::is_same<T, float>::value) {
      v = v_head + base;
    } else {
      for (int x = 0; x < kPS * kD; ++x) vf[x] = load(v_head[base + x]);
      v = vf;
    }
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
      float sc[kRowBlock][kPS] = {};
      const float* qs[kRowBlock];
      for (int b = 0; b < kRowBlock; ++b) qs[b] = q_row(r0 + b);
      for (int x = 0; x < kD; ++x) {
        const float* kx = kt + x * kPS;
#pragma GCC unroll 4
        for (int b = 0; b < kRowBlock; ++b) {
          const float qv = qs[b][x];
#pragma omp simd
          for (int j = 0; j < kPS; ++j) sc[b][j] += qv * kx[j];
        }
      }
      for (int b = 0; b < kRowBlock && r0 + b < R; ++b) {
        const int r = r0 + b, pos = first_pos + r / G;
        const int ja = std::max(pb.window > 0 ? pos - pb.window + 1 - p * kPS : 0, 0);
        const int jb = std::min(pos + 1 - p * kPS, kPS);
        float* s = scores + static_cast<size_t>(r) * kPS;
        if (ja >= jb) {
          std::fill(s, s + kPS, 0.f);
          continue;
        }
        float* row = sc[b];
        if (pb.soft_cap > 0.f) {
          for (int j = 0; j < kPS; ++j) row[j] = pb.soft_cap / pb.sm_scale * std::tanh(row[j] * pb.sm_scale / pb.soft_cap);
        }
        float mx = m[r];
#pragma omp simd reduction(max : mx)
        for (int j = 0; j < kPS; ++j) {
          const float v0 = (j >= ja && j < jb) ? row[j] * pb.sm_scale : kMasked;
          row[j] = v0;
          mx = std::max(mx, v0);
        }
        const float alpha = exp_neg(m[r] - mx);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < kPS; ++j) {
          const float e = exp_neg(row[j] - mx);
          s[j] = e;
          sum += e;
        }
        m[r] = mx;
        l[r] = l[r] * alpha + sum;
        if (alpha != 1.f) {
          float* ar = acc + static_cast<size_t>(r) * kD;
#pragma omp simd
          for (int x = 0; x < kD; ++x) ar[x] *= alpha;
        }
      }
    }
    for (int r = 0; r < R; r += 2) {
      const float* s0 = scores + static_cast<size_t>(r) * kPS;
      const float* s1 = r + 1 < R ? s0 + kPS : zeros;
      float* a0 = acc + static_cast<size_t>(r) * kD;
      alignas(32) float dummy[kD];
      float* a1 = r + 1 < R ? a0 + kD : dummy;
      for (int j = 0; j < kPS; ++j) {
        const float p0 = s0[j], p1 = s1[j];
        if (p0 == 0.f && p1 == 0.f) continue;
        const float* vj = v + j * kD;
#pragma omp simd
        for (int x = 0; x < kD; ++x) {
          a0[x] += p0 * vj[x];
          a1[x] += p1 * vj[x];
        }
      }
    }
  }
}

// Shared by the calling thread and the pool tasks; a task that starts after the call returned
// finds no item left and touches only this (kept alive by its shared_ptr).
struct Work {
  Problem pb;
  std::vector<Item> items;
  std::vector<float> partial;  // per decode split item: G maxima, G sums, G x D accumulators
  std::atomic<int> next{0}, done{0};
  enum class Elem { kF32, kBF16, kF8E4M3FN } elem = Elem::kF32;

  size_t stride() const { return static_cast<size_t>(pb.group) * (pb.d + 2); }

  template <int kD>
  void run(const Item& it, float* m, float* l, float* acc, float* scores) {
    if (elem == Elem::kBF16) {
      run_item<uint16_t, kD>(pb, it, m, l, acc, scores);
    } else if (elem == Elem::kF8E4M3FN) {
      run_item<uint8_t, kD>(pb, it, m, l, acc, scores);
    } else {
      run_item<float, kD>(pb, it, m, l, acc, scores);
    }
  }

  template <int kD>
  void tile(const Item& it, float* m, float* l, float* acc, float* scores) {
    if (elem == Elem::kBF16) {
      run_tile<uint16_t, kD, 16>(pb, it, m, l, acc, scores);
    } else if (elem == Elem::kF8E4M3FN) {
      run_tile<uint8_t, kD, 16>(pb, it, m, l, acc, scores);
    } else {
      run_tile<float, kD, 16>(pb, it, m, l, acc, scores);
    }
  }

  void drain() {
    const int G = pb.group, D = pb.d, R = kTileTokens * G, Hq = pb.hkv * G;
    std::vector<float> scores(static_cast<size_t>(R) * pb.page_size), ml(2 * R), acc(static_cast<size_t>(R) * D);
    const int n = static_cast<int>(items.size());
    for (int i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      const Item& it = items[i];
      float *m = ml.data(), *l = ml.data() + R, *a = acc.data();
      if (it.partial >= 0) {
        m = partial.data() + it.partial * stride();
        l = m + G;
        a = l + G;
      }
      if (it.nq > 1 && pb.page_size == 16 && D == 64) {
        tile<64>(it, m, l, a, scores.data());
      } else if (it.nq > 1 && pb.page_size == 16 && D == 128) {
        tile<128>(it, m, l, a, scores.data());
      } else if (D == 64) {
        run<64>(it, m, l, a, scores.data());
      } else if (D == 128) {
        run<128>(it, m, l, a, scores.data());
      } else {
        run<0>(it, m, l, a, scores.data());
      }
      if (it.partial < 0) {  // normalise straight into the output
        const int token0 = pb.query_start_loc[it.row] + it.q0;
        for (int t = 0; t < it.nq; ++t) {
          for (int g = 0; g < G; ++g) {
            const int r = t * G + g;
            float* dst = pb.out + (static_cast<size_t>(token0 + t) * Hq + static_cast<size_t>(it.head) * G + g) * D;
            const float inv = 1.f / std::max(l[r], 1e-30f);
            for (int x = 0; x < D; ++x) dst[x] = a[static_cast<size_t>(r) * D + x] * inv;
          }
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RaggedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer cache,
                           ffi::Buffer<ffi::S32> q_lens, ffi::Buffer<ffi::S32> seq_lens,
                           ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> query_start_loc,
                           ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                           int32_t sliding_window) {
  const auto qd = q.dimensions();
  const auto cd = cache.dimensions();
  const auto bd = block_tables.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || bd.size() != 2 || cd[0] != 2 || cd[4] != qd[2] || qd[1] % cd[1] != 0) {
    return ffi::Error::InvalidArgument("paged attention: q must be [T, Hq, D] and cache [2, Hkv, pages, page_size, D]");
  }
  const auto type = cache.element_type();
  const bool fp8 = type == ffi::F8E4M3FN || type == ffi::U8;  // U8: the e4m3 bytes of an fp8 cache
  if (type != ffi::F32 && type != ffi::BF16 && !fp8) {
    return ffi::Error::InvalidArgument("paged attention: the cache must be float32, bfloat16 or float8_e4m3fn (bytes)");
  }
  const int S = static_cast<int>(bd[0]);
  auto work = std::make_shared<Work>();
  work->elem = type == ffi::BF16 ? Work::Elem::kBF16 : fp8 ? Work::Elem::kF8E4M3FN : Work::Elem::kF32;
  Problem& pb = work->pb;
  pb.q = q.typed_data();
  pb.cache = cache.untyped_data();
  pb.block_tables = block_tables.typed_data();
  pb.seq_lens = seq_lens.typed_data();
  pb.q_lens = q_lens.typed_data();
  pb.query_start_loc = query_start_loc.typed_data();
  pb.out = out->typed_data();
  pb.tokens = static_cast<int>(qd[0]);
  pb.hkv = static_cast<int>(cd[1]);
  pb.group = static_cast<int>(qd[1] / cd[1]);
  pb.d = static_cast<int>(qd[2]);
  pb.num_pages = static_cast<int>(cd[2]);
  pb.page_size = static_cast<int>(cd[3]);
  pb.max_pages = static_cast<int>(bd[1]);
  pb.window = sliding_window;
  pb.sm_scale = sm_scale;
  pb.soft_cap = soft_cap;
  const int Hq = pb.hkv * pb.group, D = pb.d;
  const int split = std::max(kSplitTokens / pb.page_size, 1) * pb.page_size;
  const int max_len = pb.max_pages * pb.page_size;

  // Rows are laid out back to back from token 0; the caller zeroes q_lens past num_seqs.
  // A split decode row's (row, head) and its items' consecutive partial slots, for the merge.
  struct Split {
    int row, head, first_slot, num_slots;
  };
  std::vector<Split> splits;
  int covered = 0, partials = 0;
  for (int s = 0; s < S; ++s) {
    const int n = pb.q_lens[s];
    const int start = pb.query_start_loc[s];
    if (n <= 0 || start < 0 || start + n > pb.tokens) continue;
    covered = std::max(covered, start + n);
    const int len = std::min(pb.seq_lens[s], max_len);
    if (n == 1 && len > split) {  // a long decode row: split its context
      const int lo = sliding_window > 0 ? std::max(len - sliding_window, 0) : 0;
      for (int h = 0; h < pb.hkv; ++h) {
        splits.push_back(Split{s, h, partials, 0});
        for (int a = lo; a < len; a = (a / split + 1) * split) {
          const int b = std::min((a / split + 1) * split, len);
          work->items.push_back(Item{s, h, 0, 1, a, b, partials++, b - a});
          ++splits.back().num_slots;
        }
      }
      continue;
    }
    for (int h = 0; h < pb.hkv; ++h) {
      for (int t = 0; t < n; t += kTileTokens) {
        const int nq = std::min(kTileTokens, n - t), span = len - n + t + nq;
        const int keys = sliding_window > 0 ? std::min(span, sliding_window + nq) : span;
        work->items.push_back(Item{s, h, t, nq, -1, -1, -1, nq * keys});
      }
    }
  }
  float* o = pb.out;
  std::fill(o + static_cast<size_t>(covered) * Hq * D, o + static_cast<size_t>(pb.tokens) * Hq * D, 0.f);
  const int n = static_cast<int>(work->items.size());
  if (n == 0) return ffi::Error::Success();
  work->partial.resize(static_cast<size_t>(partials) * work->stride());
  // Longest items first (the causal tiles at the end of long rows), so the threads finish together.
  std::stable_sort(work->items.begin(), work->items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  // Little work (a decode row's short context): waking the pool would cost more than it saves.
  int64_t work_units = 0;
  for (const Item& it : work->items) work_units += static_cast<int64_t>(it.cost) * pb.group;
  const int helpers = work_units < kInlineWork ? 0 : static_cast<int>(std::min<int64_t>(pool.num_threads(), n - 1));
  for (int t = 0; t < helpers; ++t) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();

  // Merge each split decode row's partial softmaxes into its output.
  const int G = pb.group;
  const size_t stride = work->stride();
  for (const Split& sp : splits) {
    const float* first = work->partial.data() + static_cast<size_t>(sp.first_slot) * stride;
    for (int g = 0; g < G; ++g) {
      float mx = kMasked;
      for (int j = 0; j < sp.num_slots; ++j) mx = std::max(mx, first[j * stride + g]);
      float* dst = o + (static_cast<size_t>(pb.query_start_loc[sp.row]) * Hq + static_cast<size_t>(sp.head) * G + g) * D;
      std::fill(dst, dst + D, 0.f);
      float total = 0.f;
      for (int j = 0; j < sp.num_slots; ++j) {
        const float* m = first + j * stride;
        const float w = std::exp(m[g] - mx);
        total += w * m[G + g];
        const float* acc = m + 2 * G + static_cast<size_t>(g) * D;
        for (int x = 0; x < D; ++x) dst[x] += w * acc[x];
      }
      const float inv = 1.f / std::max(total, 1e-30f);
      for (int x = 0; x < D; ++x) dst[x] *= inv;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineRaggedPagedAttention, RaggedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("sliding_window"));
