// One layer's projection read in place from the stacked weights, native on the CPU (an XLA FFI
// custom call): y[T, N] = x[T, K] @ w[layer, K, N].
//
// Why native: the model scans its layers over weights stacked [L, K, N], and XLA's CPU dot needs
// its operand in a buffer of its own, so every step copied each layer's matrices out of the stack
// before multiplying (a dynamic slice is a fresh buffer on the CPU). A decode step with few rows is
// bound by reading the weights, and the copy tripled the bytes it moved. Here the layer's matrix is
// read where it lies, once per row tile.
//
// Work item = a block of kBlock output columns; it walks the K rows of its block (kBlock
// contiguous values each, one stream the prefetcher follows) and keeps up to kRows rows of x
// times the block in registers; more rows of x re-read the block, from L2 by then. Items run on
// XLA's intra-op thread pool. Weights float32 or bfloat16 (widened here), x and y float32.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // output columns per item: 4 AVX-512 registers of float32
constexpr int kRows = 4;    // rows of x per pass over a block: 16 accumulator registers
constexpr int kAhead = 8;   // rows of w prefetched ahead

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// acc[r][j] = sum_k x[r][k] * w[k][j] for R rows and NB (<= kBlock) columns starting at w.
template <typename W, int R, int NB>
void tile(const float* x, int64_t K, const W* w, int64_t N, float* y) {
  float acc[R][NB] = {};
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w + k * N;
    // The rows of a block are N values apart (past a 4 KiB page for wide matrices, where the
    // hardware prefetcher stops following): fetch kAhead rows ahead by hand.
    if (k + kAhead < K) {
      const char* ahead = reinterpret_cast<const char*>(wk + kAhead * N);
      for (size_t b = 0; b < sizeof(W) * NB; b += 64) __builtin_prefetch(ahead + b);
    }
    float xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x[r * K + k];
#pragma omp simd
    for (int j = 0; j < NB; ++j) {
      const float v = widen(wk[j]);
      for (int r = 0; r < R; ++r) acc[r][j] += xr[r] * v;
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * N, acc[r], sizeof(float) * NB);
}

// The columns [n0, n0 + nb) of every row of y.
template <typename W, int NB>
void block_rows(const float* x, int64_t T, int64_t K, const W* w, int64_t N, float* y, int64_t n0) {
  int64_t t = 0;
  for (; t + kRows <= T; t += kRows) tile<W, kRows, NB>(x + t * K, K, w + n0, N, y + t * N + n0);
  switch (T - t) {
    case 3: tile<W, 3, NB>(x + t * K, K, w + n0, N, y + t * N + n0); break;
    case 2: tile<W, 2, NB>(x + t * K, K, w + n0, N, y + t * N + n0); break;
    case 1: tile<W, 1, NB>(x + t * K, K, w + n0, N, y + t * N + n0); break;
    default: break;
  }
}

// A last block narrower than kBlock: columns one at a time (rare: N is a multiple of 64 in practice).
template <typename W>
void narrow_block(const float* x, int64_t T, int64_t K, const W* w, int64_t N, float* y, int64_t n0) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = n0; n < N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[t * K + k] * widen(w[k * N + n]);
      y[t * N + n] = s;
    }
  }
}

struct Work {
  const float* x;
  const void* w;
  float* y;
  int64_t T, K, N;
  bool bf16;
  int blocks;
  std::atomic<int> next{0}, done{0};

  template <typename W>
  void run(int b) {
    const W* wp = static_cast<const W*>(w);
    const int64_t n0 = static_cast<int64_t>(b) * kBlock;
    if (n0 + kBlock <= N) {
      block_rows<W, kBlock>(x, T, K, wp, N, y, n0);
    } else {
      narrow_block<W>(x, T, K, wp, N, y, n0);
    }
  }

  void drain() {
    for (int b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      if (bf16) {
        run<uint16_t>(b);
      } else {
        run<float>(b);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error StackedLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("stacked linear: expected x[T, K] and w[L, K, N]");
  }
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16 && w.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("stacked linear: weights must be float32 or bfloat16");
  }
  const int64_t L = wd[0], K = wd[1], N = wd[2], T = xd[0];
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const size_t esize = bf16 ? 2 : 4;
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = static_cast<const char*>(w.untyped_data()) + static_cast<size_t>(l) * K * N * esize;
  work->y = y->typed_data();
  work->T = T;
  work->K = K;
  work->N = N;
  work->bf16 = bf16;
  work->blocks = static_cast<int>((N + kBlock - 1) / kBlock);
  if (T == 0 || N == 0) return ffi::Error::Success();
  const int n = work->blocks;
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), n - 1));
  for (int t = 0; t < helpers; ++t) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineStackedLinear, StackedLinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
