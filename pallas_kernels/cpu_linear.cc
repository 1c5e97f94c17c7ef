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
// contiguous values each, prefetched by hand) and keeps up to kRows rows of x times the block in
// registers; more rows of x re-read the block, from L2 by then. Items run on the calling thread
// and helper threads of this library (`Crew`). Weights float32 or bfloat16 (widened here), x and
// y float32. The same items serve a grouped matmul (mixture of experts): each expert's rows times
// its matrix, read in place from the stacked [L * E, K, N] experts. And the LM head of a decode
// step: logits = x @ e^T over the [V, H] embedding (or untied head), read in place a block of
// vocabulary rows per item.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // output columns per item: 4 AVX-512 registers of float32
constexpr int kWide = 256;  // columns per item for 1-2 rows (decode): longer runs of each weight row
constexpr int kWideRows = 2;
constexpr int kRows = 4;    // rows of x per pass over a block: 16 accumulator registers
constexpr int kAhead = 8;   // rows of w prefetched ahead
constexpr std::chrono::microseconds kSpin{500};  // how long an idle helper keeps looking for work

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 float32 lanes (one AVX-512 register; two AVX2 ones elsewhere, the compiler splits them).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {  // bfloat16: the high half of a float32
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline float hsum(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  lo += hi;
  return ((lo[0] + lo[4]) + (lo[1] + lo[5])) + ((lo[2] + lo[6]) + (lo[3] + lo[7]));
}

// acc[r][j] = sum_k x[r][k] * w[k][j] for R rows and NB columns starting at w (rows N apart),
// stored at y (rows ldy apart).
template <typename W, int R, int NB>
void tile(const float* x, int64_t K, const W* w, int64_t N, float* y, int64_t ldy) {
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
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, acc[r], sizeof(float) * NB);
}

// The columns [n0, n0 + NB) of every row of y (w's rows N apart, y's ldy apart).
template <typename W, int NB>
void block_rows(const float* x, int64_t T, int64_t K, const W* w, int64_t N, float* y, int64_t ldy, int64_t n0) {
  int64_t t = 0;
  for (; t + kRows <= T; t += kRows) tile<W, kRows, NB>(x + t * K, K, w + n0, N, y + t * ldy + n0, ldy);
  switch (T - t) {
    case 3: tile<W, 3, NB>(x + t * K, K, w + n0, N, y + t * ldy + n0, ldy); break;
    case 2: tile<W, 2, NB>(x + t * K, K, w + n0, N, y + t * ldy + n0, ldy); break;
    case 1: tile<W, 1, NB>(x + t * K, K, w + n0, N, y + t * ldy + n0, ldy); break;
    default: break;
  }
}

// A last block narrower than kBlock: columns one at a time (rare: N is a multiple of 64 in practice).
template <typename W>
void narrow_block(const float* x, int64_t T, int64_t K, const W* w, int64_t N, float* y, int64_t ldy, int64_t n0) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = n0; n < N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[t * K + k] * widen(w[k * N + n]);
      y[t * ldy + n] = s;
    }
  }
}

// A call's work: `count` items taken in turn (an atomic counter) by the calling thread and helpers.
// Shared through a shared_ptr, so a helper that starts after the call returned finds no item left
// and touches only this.
struct Job {
  int count = 0;
  std::atomic<int> next{0}, done{0};
  virtual ~Job() = default;
  virtual void run(int item) = 0;

  void drain() {
    for (int i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      run(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads of our own (one per core besides the caller's), which after each call keep looking
// for the next one for kSpin before they sleep. A decode step makes ~4 calls per layer, each only
// 0.1-0.5 ms of streaming: a helper woken from sleep for each (XLA's pool) starts late and the call
// runs mostly on one core. A call's items are taken in turn, so the caller alone finishes any call
// the helpers miss (another call's, a forked child without them).
class Crew {
 public:
  static Crew& get(int helpers) {
    static Crew* crew = new Crew(helpers);  // never destroyed: its threads live as long as the process
    return *crew;
  }
  void post(std::shared_ptr<Job> job) {
    while (lock_.test_and_set(std::memory_order_acquire)) {}
    job_ = std::move(job);
    lock_.clear(std::memory_order_release);
    epoch_.fetch_add(1, std::memory_order_release);
    epoch_.notify_all();
  }

 private:
  explicit Crew(int helpers) {
    for (int t = 0; t < helpers; ++t) std::thread([this] { loop(); }).detach();
  }
  std::shared_ptr<Job> take() {
    while (lock_.test_and_set(std::memory_order_acquire)) {}
    std::shared_ptr<Job> job = job_;
    lock_.clear(std::memory_order_release);
    return job;
  }
  void loop() {
    uint32_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      uint32_t e;
      while ((e = epoch_.load(std::memory_order_acquire)) == seen) {
        if (std::chrono::steady_clock::now() > until) {
          epoch_.wait(seen, std::memory_order_acquire);
        } else {
          std::this_thread::yield();
        }
      }
      seen = e;
      if (auto job = take()) job->drain();
    }
  }
  std::atomic_flag lock_ = ATOMIC_FLAG_INIT;
  std::shared_ptr<Job> job_;
  std::atomic<uint32_t> epoch_{0};
};

// Runs every item of `job`: the calling thread and the crew (sized to XLA's intra-op pool) together.
void run_job(ffi::ThreadPool& pool, std::shared_ptr<Job> job) {
  const int n = job->count;
  if (n == 0) return;
  const int helpers = static_cast<int>(pool.num_threads()) - 1;
  if (n > 1 && helpers > 0) Crew::get(helpers).post(job);
  job->drain();
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// One work item: rows [row0, row0 + rows) of x times columns [n0, n0 + width) of matrix w
// ([K, n] with rows n apart), written to y's columns from y0 + n0.
struct Item {
  const void* w;
  int64_t n, y0, row0, rows, n0, width;
};

// A projection call's items (column blocks of one or more matrices).
struct Work : Job {
  const float* x;
  float* y;
  int64_t K, N;  // N: y's row length (the sum of the matrices' widths)
  bool bf16;
  std::vector<Item> items;

  template <typename W>
  void run_item(const Item& it) {
    const W* wp = static_cast<const W*>(it.w);
    const float* xs = x + it.row0 * K;
    float* ys = y + it.row0 * N + it.y0;  // column 0 of this matrix's part of y
    if (it.width == kWide) {
      block_rows<W, kWide>(xs, it.rows, K, wp, it.n, ys, N, it.n0);
    } else if (it.n0 + kBlock <= it.n) {
      block_rows<W, kBlock>(xs, it.rows, K, wp, it.n, ys, N, it.n0);
    } else {
      narrow_block<W>(xs, it.rows, K, wp, it.n, ys, N, it.n0);
    }
  }

  void run(int i) override {
    if (bf16) {
      run_item<uint16_t>(items[i]);
    } else {
      run_item<float>(items[i]);
    }
  }

  // Adds the column blocks of rows [row0, row0 + rows) times matrix w. One or two rows do so little
  // arithmetic per weight that the weight stream alone sets the pace: they take wide blocks, whose
  // longer contiguous runs of each weight row the memory system serves faster (accumulators in L1).
  // `n` is the matrix's width and `y0` its first column in y (0 and N for a single matrix).
  void add(const void* w, int64_t row0, int64_t rows, int64_t n = -1, int64_t y0 = 0) {
    if (n < 0) n = N;
    int64_t n0 = 0;
    if (rows <= kWideRows) {
      for (; n0 + kWide <= n; n0 += kWide) items.push_back(Item{w, n, y0, row0, rows, n0, kWide});
    }
    for (; n0 < n; n0 += kBlock) items.push_back(Item{w, n, y0, row0, rows, n0, kBlock});
  }

  void run_all(ffi::ThreadPool& pool, std::shared_ptr<Work> self) {
    count = static_cast<int>(items.size());
    run_job(pool, std::move(self));
  }
};

// Checks x[T, K] against w[G, K, N] (float32 or bfloat16) and sets up the work; nullptr + error when they do not fit.
std::shared_ptr<Work> make_work(ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& w, ffi::ResultBuffer<ffi::F32>& y, ffi::Error* error) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1]) {
    *error = ffi::Error::InvalidArgument("stacked linear: expected x[T, K] and w[G, K, N]");
    return nullptr;
  }
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16 && w.element_type() != ffi::DataType::F32) {
    *error = ffi::Error::InvalidArgument("stacked linear: weights must be float32 or bfloat16");
    return nullptr;
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->y = (*y).typed_data();
  work->K = wd[1];
  work->N = wd[2];
  work->bf16 = bf16;
  return work;
}

// How many leading rows of x[T, ...] are real (`rows`, clamped to [0, T]); the rest of a step's
// bucket is padding, which the kernels leave as zeros in y instead of reading the weights for it
// (a one-row decode step runs in a bucket of several).
int64_t real_rows(ffi::Buffer<ffi::S32>& rows, int64_t T) { return std::clamp<int64_t>(rows.typed_data()[0], 0, T); }

// Matrix g of w[G, K, N] (clamped into range).
const void* matrix(ffi::AnyBuffer& w, int64_t g) {
  const auto wd = w.dimensions();
  g = std::clamp<int64_t>(g, 0, wd[0] - 1);
  const size_t esize = w.element_type() == ffi::DataType::BF16 ? 2 : 4;
  return static_cast<const char*>(w.untyped_data()) + static_cast<size_t>(g) * wd[1] * wd[2] * esize;
}

// y[T, N] = x[T, K] @ w[layer] for x's first `rows` rows (zeros below).
ffi::Error StackedLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error error = ffi::Error::Success();
  auto work = make_work(x, w, y, &error);
  if (!work) return error;
  const int64_t T = x.dimensions()[0], real = real_rows(rows, T);
  std::fill(work->y + real * work->N, work->y + T * work->N, 0.f);
  work->add(matrix(w, layer.typed_data()[0]), 0, real);
  work->run_all(pool, work);
  return ffi::Error::Success();
}

// y[T, N1 + N2 + ...] = x[T, K] @ [w1[layer] | w2[layer] | ...]: the projections that read the
// same input (q, k and v; gate and up) in one call, their column blocks shared out together. Only
// x's first `rows` rows, as `StackedLinear`.
ffi::Error StackedLinears(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                          ffi::RemainingArgs ws, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() == 0) return ffi::Error::InvalidArgument("stacked linears: expected x[T, K] and weights");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->y = y->typed_data();
  work->K = xd[1];
  work->N = y->dimensions()[1];
  const int64_t real = real_rows(rows, xd[0]);
  std::fill(work->y + real * work->N, work->y + xd[0] * work->N, 0.f);
  int64_t y0 = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    if (!w.has_value()) return ffi::Error::InvalidArgument("stacked linears: a weight is not a buffer");
    const auto wd = w->dimensions();
    const bool bf16 = w->element_type() == ffi::DataType::BF16;
    if (wd.size() != 3 || wd[1] != xd[1] || (!bf16 && w->element_type() != ffi::DataType::F32) || (i > 0 && bf16 != work->bf16)) {
      return ffi::Error::InvalidArgument("stacked linears: weights must be [L, K, n], all float32 or all bfloat16");
    }
    work->bf16 = bf16;
    work->add(matrix(*w, layer.typed_data()[0]), 0, real, wd[2], y0);
    y0 += wd[2];
  }
  if (y0 != work->N) return ffi::Error::InvalidArgument("stacked linears: y's width is not the sum of the weights'");
  work->run_all(pool, work);
  return ffi::Error::Success();
}

// A grouped matmul over rows sorted by group: rows [start_e, start_e + sizes[e]) of x times
// w[base + e], for each e; rows past the last group come out as zeros. One call per projection of
// a mixture-of-experts layer: only the experts with rows are read, each once per 4 rows.
ffi::Error StackedRaggedDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> base,
                            ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error error = ffi::Error::Success();
  auto work = make_work(x, w, y, &error);
  if (!work) return error;
  const int64_t T = x.dimensions()[0];
  const int64_t groups = sizes.element_count();
  const int32_t* sz = sizes.typed_data();
  int64_t row = 0;
  for (int64_t e = 0; e < groups && row < T; ++e) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(sz[e], 0), T - row);
    if (n > 0) work->add(matrix(w, base.typed_data()[0] + e), row, n);
    row += n;
  }
  std::fill(work->y + row * work->N, work->y + T * work->N, 0.f);
  work->run_all(pool, work);
  return ffi::Error::Success();
}

// ---- The LM head: logits[T, V] = x[T, H] @ e[V, H]^T, e (the embedding, or an untied head) read
// in place. Each logit is the dot of x's row with one contiguous row of e: work items are blocks of
// kHeadRows vocabulary rows, each streamed once from memory; 4 of its rows at a time stay in L1 while
// every row of x (up to 4 per pass, 16 accumulators) multiplies them.
constexpr int64_t kHeadRows = 128;
constexpr int64_t kHeadAhead = 16;  // rows of e prefetched ahead

// y[r][v] = x[r] . e[v] for R rows of x and VB rows of e (both H apart; y's rows ldy apart).
template <typename W, int R, int VB>
void head_tile(const float* x, int64_t H, const W* e, float* y, int64_t ldy) {
  f32x16 acc[R][VB] = {};
  int64_t h = 0;
  for (; h + 16 <= H; h += 16) {
    // The next rows of e lie right after these, but this tile reads VB of them side by side, a stream
    // the hardware prefetcher is slow to follow: fetch kHeadAhead rows ahead by hand.
    for (int v = 0; v < VB; ++v) __builtin_prefetch(e + (kHeadAhead + v) * H + h);
    f32x16 ev[VB];
    for (int v = 0; v < VB; ++v) ev[v] = load16(e + v * H + h);
    for (int r = 0; r < R; ++r) {
      const f32x16 xv = load16(x + r * H + h);
      for (int v = 0; v < VB; ++v) acc[r][v] += xv * ev[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < VB; ++v) {
      float s = hsum(acc[r][v]);
      for (int64_t t = h; t < H; ++t) s += x[r * H + t] * widen(e[v * H + t]);
      y[r * ldy + v] = s;
    }
  }
}

template <typename W, int VB>
void head_rows(const float* x, int64_t T, int64_t H, const W* e, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) head_tile<W, 4, VB>(x + t * H, H, e, y + t * ldy, ldy);
  switch (T - t) {
    case 3: head_tile<W, 3, VB>(x + t * H, H, e, y + t * ldy, ldy); break;
    case 2: head_tile<W, 2, VB>(x + t * H, H, e, y + t * ldy, ldy); break;
    case 1: head_tile<W, 1, VB>(x + t * H, H, e, y + t * ldy, ldy); break;
    default: break;
  }
}

struct HeadWork : Job {
  const float* x;
  const void* e;
  float* y;
  int64_t T, H, V;
  bool bf16;

  template <typename W>
  void rows_of(int item) {
    const W* e0 = static_cast<const W*>(e);
    const int64_t v_end = std::min<int64_t>(V, (item + 1) * kHeadRows);
    int64_t v = item * kHeadRows;
    for (; v + 4 <= v_end; v += 4) head_rows<W, 4>(x, T, H, e0 + v * H, y + v, V);
    for (; v < v_end; ++v) head_rows<W, 1>(x, T, H, e0 + v * H, y + v, V);
  }

  void run(int item) override {
    if (bf16) {
      rows_of<uint16_t>(item);
    } else {
      rows_of<float>(item);
    }
  }
};

// y[T, V] = x[T, H] @ e[V, H]^T for x's first `rows` rows (zeros below).
ffi::Error LmHead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer e, ffi::Buffer<ffi::S32> rows,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto ed = e.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || ed[1] != xd[1]) return ffi::Error::InvalidArgument("lm head: expected x[T, H] and e[V, H]");
  const bool bf16 = e.element_type() == ffi::DataType::BF16;
  if (!bf16 && e.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument("lm head: weights must be float32 or bfloat16");
  auto work = std::make_shared<HeadWork>();
  work->x = x.typed_data();
  work->e = e.untyped_data();
  work->y = y->typed_data();
  work->T = real_rows(rows, xd[0]);
  work->H = xd[1];
  work->V = ed[0];
  work->bf16 = bf16;
  std::fill(work->y + work->T * work->V, work->y + xd[0] * work->V, 0.f);
  work->count = work->T == 0 ? 0 : static_cast<int>((work->V + kHeadRows - 1) / kHeadRows);
  run_job(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineStackedLinear, StackedLinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineStackedLinears, StackedLinears,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineStackedRaggedDot, StackedRaggedDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JengineLmHead, LmHead,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
