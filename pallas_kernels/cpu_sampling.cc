// The sampler's top-k / top-p thresholds, native on the CPU (an XLA FFI custom call).
//
// thr[s] = the largest value v of row s of x with sum(w[s, j] for x[s, j] >= v) >= target[s]:
// with w = 1 and target = k it is the k-th largest value (top-k); with w the row's kept
// probabilities and target = p * their sum it is the top-p cut. Rows with target <= 0 get -inf (no
// cut); a row whose whole mass falls short gets its smallest value.
//
// Why native: in `jax.numpy` the exact cut is a 32-step bisection, each step a pass over the [S, V]
// logits (about 90 ms for 64 rows of a 49152-token vocabulary on 2 cores), and XLA's CPU `top_k`
// over [S, V] takes 16 ms even for 64 candidates. Here each row is a radix select over the float's
// order-preserving bit pattern: a histogram of the top 11 bits' mass over the row, the bucket where
// the mass from the top reaches the target, then the next 11 bits and the last 10 within it, each
// level over only the elements left (two passes over the row, then small ones). Sums are in double.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// float -> uint32 whose integer order is the float order (-inf lowest; no NaNs expected).
inline uint32_t ordered(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline float unordered(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

struct Entry {
  uint32_t key;
  double w;
};

// Levels of the radix select: (shift, bits) from the top of the key.
constexpr int kLevels = 3;
constexpr int kShift[kLevels] = {21, 10, 0};
constexpr int kBits[kLevels] = {11, 11, 10};

// One row. `w` is null for unit weights.
float row_threshold(const float* x, const float* w, int64_t V, double target, std::vector<Entry>& buf,
                    std::vector<double>& hist) {
  if (!(target > 0.0)) return -std::numeric_limits<float>::infinity();
  uint32_t min_key = 0xFFFFFFFFu;
  double above = 0.0;    // mass of the elements above the current bucket
  uint32_t prefix = 0;   // the key bits chosen so far
  // Level 0 over the whole row.
  hist.assign(size_t{1} << kBits[0], 0.0);
  for (int64_t j = 0; j < V; ++j) {
    const uint32_t k = ordered(x[j]);
    min_key = std::min(min_key, k);
    const double m = w ? static_cast<double>(w[j]) : 1.0;
    if (m > 0.0) hist[k >> kShift[0]] += m;
  }
  auto pick = [&](int level) -> bool {  // the bucket where the mass from the top reaches the target
    for (int64_t b = (int64_t{1} << kBits[level]) - 1; b >= 0; --b) {
      if (hist[b] > 0.0 && above + hist[b] >= target) {
        prefix |= static_cast<uint32_t>(b) << kShift[level];
        return true;
      }
      above += hist[b];
    }
    return false;
  };
  if (!pick(0)) return unordered(min_key);  // the whole row falls short
  // The elements of that bucket (positive mass only: a cut always lands on one of them).
  buf.clear();
  const uint32_t top = prefix >> kShift[0];
  for (int64_t j = 0; j < V; ++j) {
    const uint32_t k = ordered(x[j]);
    const double m = w ? static_cast<double>(w[j]) : 1.0;
    if ((k >> kShift[0]) == top && m > 0.0) buf.push_back(Entry{k, m});
  }
  for (int level = 1; level < kLevels; ++level) {
    const uint32_t mask = (uint32_t{1} << kBits[level]) - 1;
    hist.assign(size_t{1} << kBits[level], 0.0);
    for (const Entry& e : buf) hist[(e.key >> kShift[level]) & mask] += e.w;
    if (!pick(level)) {
      // Rounding: the bucket sums reached the target, this level's do not quite; the smallest key left.
      uint32_t lowest = 0xFFFFFFFFu;
      for (const Entry& e : buf) lowest = std::min(lowest, e.key);
      return unordered(lowest);
    }
    const int shift = kShift[level];
    const uint32_t chosen = (prefix >> shift) & mask;
    size_t n = 0;
    for (const Entry& e : buf) {
      if (((e.key >> shift) & mask) == chosen) buf[n++] = e;
    }
    buf.resize(n);
  }
  return unordered(prefix);
}

struct Work {
  const float* x;
  const float* w;  // null: unit weights
  const float* target;
  float* out;
  int64_t S, V;
  std::atomic<int64_t> next{0}, done{0};

  void drain() {
    std::vector<Entry> buf;
    std::vector<double> hist;
    for (int64_t s; (s = next.fetch_add(1)) < S;) {
      out[s] = row_threshold(x + s * V, w ? w + s * V : nullptr, V, static_cast<double>(target[s]), buf, hist);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kInlineElements = int64_t{1} << 18;  // below this, waking the pool costs more than it saves

// out[S] for x[S, V], w[S, V] (or w[1]: unit weights), target[S].
ffi::Error MassThreshold(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> target, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || target.element_count() != static_cast<size_t>(xd[0])) {
    return ffi::Error::InvalidArgument("mass threshold: expected x[S, V] and target[S]");
  }
  const bool unit = w.element_count() == 1;
  if (!unit && w.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("mass threshold: w must be [S, V] or a single unit weight");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = unit ? nullptr : w.typed_data();
  work->target = target.typed_data();
  work->out = out->typed_data();
  work->S = xd[0];
  work->V = xd[1];
  int64_t busy = 0;  // rows that cut
  for (int64_t s = 0; s < work->S; ++s) busy += work->target[s] > 0.f;
  const int helpers = busy * work->V < kInlineElements ? 0 : static_cast<int>(std::min<int64_t>(pool.num_threads(), busy - 1));
  for (int t = 0; t < helpers; ++t) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < work->S) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineMassThreshold, MassThreshold,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
