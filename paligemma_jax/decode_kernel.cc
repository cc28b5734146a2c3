// y[M, R] = x[M, D] times each row of w[R, D]: a decode step's products on
// x86 CPUs with AVX2 and FMA, or AVX-512, for a handful of rows M (the
// batch).
//
// Why not XLA's dot: at 8 rows its CPU GEMM reads float32 weights at about
// half the speed of its one-row product, and it has no fast bfloat16 dot
// at all (bf16 weights stream at under 1 GB/s). Here each weight row is
// read from memory once for all M rows, and bf16 weights are widened
// to float32 in registers, so a bf16 decode step moves half the bytes of a
// float32 one (BUILD.md, "The CPU decode kernel", has the figures).
//
// Where the CPU has AVX512-BF16 and x is bf16 too (a bf16 model's
// activations), vdpbf16ps multiplies 32 bf16 pairs and adds them into 16
// float32 lanes in one instruction: no widening, half the loads of x and
// half the multiply instructions of the widening path at 8 rows.
//
// Built by paligemma_jax/decode_kernel.py the first time it is needed.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector unit: AVX-512's 16 floats and 32 registers where the build
// has it (decode_kernel.py passes -mavx512f where the CPU has it), else
// AVX2's 8 floats and 16 registers. AVX-512 takes 8 rows of x in one pass,
// two weight rows a block (16 accumulators of 32 registers): a 64-byte line
// of float32 weights costs 8 FMAs and 5 loads. AVX2 takes them as two
// passes of 4, three weight rows a block (12 accumulators, 3 of w, 1 of x:
// all 16 registers), the second pass reading the chunk from L2: a line
// costs 16 FMAs and ~9 loads, where one pass of 8 with one weight row a
// block (all AVX2 has room for) cost 18 loads and was load-port bound
// (BUILD.md, "Sessions 16-17", has the figures).
#ifdef __AVX512F__
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline void Widen(const uint16_t* p, Vec* v) {
  __m512i h = _mm512_loadu_si512(p);
  v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  v[1] = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(0xffff0000)));
}
// Weight rows a block of 8 (and 4) rows of x reads at once.
constexpr int kRows8 = 2, kRows4 = 4;
// A chunk's rows come in multiples of this: whole blocks at every pass.
constexpr int64_t kChunkRows = 8;
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float Sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void Widen(const uint16_t* p, Vec* v) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  v[1] = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(0xffff0000)));
}
constexpr int kRows8 = 1, kRows4 = 3;  // kRows8 unused: AVX2 passes are 4 rows at most
constexpr int64_t kChunkRows = 12;
#endif

// One step of a block: kStep weights of a row, as float32 vectors.
// bf16 weights come 2 * kLanes at a time in one load: a bf16 is the top
// half of a float32, so the odd ones are a mask away and the even ones a
// shift (x is packed to match: each 2 * kLanes columns as their even,
// then their odd ones).
template <typename W>
constexpr int64_t kStep = int64_t{sizeof(Vec)} / int64_t{sizeof(W)};

inline void Widen(const float* p, Vec* v) { v[0] = Load(p); }

// Each line of w read also prefetches, into L2, the line read 64-128 KB
// later: on a long row (more than kAheadCols columns) the same row
// kAheadCols further on, else (and in a long row's last kAheadCols) the
// place `wrap` bytes on that Product sets, in a later chunk. Without it,
// at 8 rows of x, where a line's FMAs take longer than its fetch, the
// hardware prefetcher (a few streams, stopping at page ends) left memory
// idle while the FMAs ran: 8 rows of float32 weights at 3B shapes streamed
// at 20-25 GB/s where one row streams at 35 (Zen 4); with it the products
// at 8 rows run 1.1-1.3x faster in float32, 1.1-1.6x in bf16 (BUILD.md,
// "Session 18"). Past w's end it is a no-op: a prefetch never faults.
constexpr int64_t kAheadCols = 4096;

// x is float32, or bf16 (as its 16-bit words) for the dot path, where
// the CPU has vdpbf16ps.
template <typename X>
constexpr bool kDot = std::is_same_v<X, uint16_t>;

// Where column k of a step's kStep columns goes in packed x: even-then-odd
// for widened bf16 weights; in order for the dot path, which pairs
// neighbours of x and w alike.
template <typename W, typename X>
constexpr int64_t Packed(int64_t k) {
  return sizeof(W) == 2 && !kDot<X> ? k % 2 * kLanes + k / 2 : k;
}

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Columns [d0, d1) of MB rows of x against RB rows of w, added into y:
// MB * RB accumulators in registers, so each load of x serves RB rows of w
// and each load of w serves MB rows of x. xp is x packed for this pass.
template <int MB, int RB, typename W, typename X>
__attribute__((noinline))  // inlined, GCC kept the accumulators on the stack
void Block(const X* x, const X* xp, const W* w, int64_t D, int64_t d0, int64_t d1,
           float* y, int64_t ldy, int64_t wrap) {
  Vec acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = Zero();
  constexpr int64_t kStep = ::kStep<W>, kVecs = kStep / kLanes;
  auto step = [&](int64_t d) {
    if constexpr (kDot<X>) {  // 32 bf16 of a row per instruction, widened by it
#ifdef __AVX512BF16__
      __m512bh wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * D + d);
      for (int m = 0; m < MB; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + d * MB + m * kStep);
        for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
      }
#else
      static_assert(!kDot<X>, "bf16 x takes a build with -mavx512bf16");
#endif
    } else {
      Vec wv[RB][kVecs];
      for (int r = 0; r < RB; ++r) Widen(w + r * D + d, wv[r]);
      for (int m = 0; m < MB; ++m) {
        for (int v = 0; v < kVecs; ++v) {
          // Unaligned load: a pass's rows start m0 * D floats in, aligned
          // whenever D is a multiple of kLanes (every real size).
          Vec xv = Load(xp + d * MB + m * kStep + v * kLanes);
          for (int r = 0; r < RB; ++r) acc[m][r] = Fma(xv, wv[r][v], acc[m][r]);
        }
      }
    }
  };
  // A block reads RB rows in parallel, each a few pages at most, which the
  // hardware prefetcher (it stops at page ends) half misses: each cache
  // line of these rows also fetches the same line of the next block's rows.
  constexpr int64_t kLine = 64 / sizeof(W);  // weights in a cache line
  int64_t d = d0;
  for (; d + kLine <= d1; d += kLine) {  // a step is a line (AVX-512) or half of one
    for (int r = 0; r < RB; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + (RB + r) * D + d), _MM_HINT_T0);
    const int64_t far = d + kAheadCols < D ? kAheadCols * int64_t{sizeof(W)} : wrap;
    for (int r = 0; r < RB; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * D + d) + far, _MM_HINT_T1);
    for (int64_t e = d; e < d + kLine; e += kStep) step(e);
  }
  for (; d + kStep <= d1; d += kStep) step(d);
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = Sum(acc[m][r]);
      for (int64_t t = d; t < d1; ++t) s += Widen(x[m * D + t]) * Widen(w[r * D + t]);
      y[m * ldy + r] += s;
    }
  }
}

// The passes over x's rows: 8 at a time (AVX-512) or 4 (AVX2), then 2, 1.
#ifdef __AVX512F__
inline int64_t PassRows(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }
#else
inline int64_t PassRows(int64_t left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }
#endif

// x [M, D] -> xp: each pass's rows packed as [D / kStep, rows, kStep], for
// loads in order (x's own rows, D floats apart, fall in the same L1 set),
// each step's columns in the order Widen gives the weights.
template <typename W, typename X>
void Pack(const X* x, int64_t M, int64_t D, X* xp) {
  constexpr int64_t kStep = ::kStep<W>;
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t mb = PassRows(M - m0);
    for (int64_t d = 0; d + kStep <= D; d += kStep)
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t k = 0; k < kStep; ++k)
          xp[m0 * D + d * mb + m * kStep + Packed<W, X>(k)] =
              x[(m0 + m) * D + d + k];
    m0 += mb;
  }
}

// Rows [r0, r1) of w against MB rows of x, RB rows of w at a time, in
// tiles of 16 KB of packed x (a tile stays in L1 while it meets every row).
template <int MB, int RB, typename W, typename X>
void Pass(const X* x, const X* xp, const W* w, int64_t D, int64_t r0, int64_t r1,
          float* y, int64_t ldy, int64_t wrap) {
  constexpr int64_t kTile = (16 << 10) / (MB * int64_t{sizeof(X)});
  for (int64_t m = 0; m < MB; ++m) std::fill(y + m * ldy + r0, y + m * ldy + r1, 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    const int64_t d1 = D - d0 <= kTile ? D : d0 + kTile;  // the last tile takes the tail
    int64_t r = r0;
    for (; r + RB <= r1; r += RB) Block<MB, RB>(x, xp, w + r * D, D, d0, d1, y + r, ldy, wrap);
    for (; r < r1; ++r) Block<MB, 1>(x, xp, w + r * D, D, d0, d1, y + r, ldy, wrap);
  }
}

// Rows [r0, r1) of w against all M rows of x.
template <typename W, typename X>
void Rows(const X* x, const X* xp, const W* w, int64_t M, int64_t D, int64_t R,
          int64_t r0, int64_t r1, float* y, int64_t wrap) {
  for (int64_t m = 0; m < M; m += PassRows(M - m)) {
    const X *xm = x + m * D, *xpm = xp + m * D;
    float* ym = y + m * R;
    switch (PassRows(M - m)) {
      case 8: Pass<8, kRows8>(xm, xpm, w, D, r0, r1, ym, R, wrap); break;
      case 4: Pass<4, kRows4>(xm, xpm, w, D, r0, r1, ym, R, wrap); break;
      case 2: Pass<2, 4>(xm, xpm, w, D, r0, r1, ym, R, wrap); break;
      default: Pass<1, 4>(xm, xpm, w, D, r0, r1, ym, R, wrap);
    }
  }
}

// w's rows in chunks of ~64 KB (a second pass over x's rows finds its
// chunk in cache), rounded up to whole blocks of every pass (kChunkRows,
// so at least 8 or 12 rows): a tile of x meets several rows before the next
// replaces it (a chunk of one 64 KB row, the down projection's, re-read all
// of x per row: 20-30% slower). The chunks go in a few contiguous shares
// per thread of XLA's intra-op pool.
// The caller takes every share nobody has started, so it never waits on a
// task that has not begun (XLA may run two of these calls at once, each on
// a pool thread).
template <typename W, typename X>
ffi::Error Product(ffi::ThreadPool pool, const X* x, const W* w, int64_t M, int64_t D,
                   int64_t R, float* y) {
  // Aligned: a load that straddles two cache lines costs two (std::vector's
  // memory is only 16-byte aligned). Outlives the work: this call waits.
  const int64_t bytes = (M * D * int64_t{sizeof(X)} + 63) / 64 * 64;
  std::unique_ptr<X, decltype(&std::free)> packed(
      static_cast<X*>(std::aligned_alloc(64, bytes)), &std::free);
  if (!packed) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "rows: out of memory");
  Pack<W>(x, M, D, packed.get());
  const X* xp = packed.get();
  const int64_t row_bytes = D * int64_t{sizeof(W)};
  const int64_t rows = std::max<int64_t>(1, (64 << 10) / row_bytes);
  const int64_t chunk = (rows + kChunkRows - 1) / kChunkRows * kChunkRows;
  const int64_t chunks = (R + chunk - 1) / chunk;
  // Chunks are read one after another (within a share), so a short row's
  // line is followed, 128 KB or more later, by the same line a whole number
  // of chunks on; a long row's last columns by the start of the row one
  // chunk down.
  const int64_t chunk_bytes = chunk * row_bytes, ahead_bytes = kAheadCols * int64_t{sizeof(W)};
  const int64_t wrap = D > kAheadCols ? ahead_bytes + chunk_bytes - row_bytes
                                      : chunk_bytes * std::max<int64_t>(1, (128 << 10) / chunk_bytes);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto job = std::make_shared<Job>();
  const int64_t shares = std::min(chunks, 4 * threads);
  auto work = [=]() {
    for (int64_t s; (s = job->next.fetch_add(1)) < shares;) {
      const int64_t c1 = (s + 1) * chunks / shares, end = std::min(R, c1 * chunk);
      for (int64_t c = s * chunks / shares; c < c1; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(end, r0 + chunk);
        Rows(x, xp, w, M, D, R, r0, r1, y, wrap);
      }
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, shares); ++t) pool.Schedule(decltype(work)(work));
  work();
  while (job->done.load(std::memory_order_acquire) < shares) _mm_pause();
  return ffi::Error::Success();
}

template <ffi::DataType TX, ffi::DataType TW>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<TX> x, ffi::Buffer<TW> w,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("rows: want x [M, D] and w [R, D]");
  using X = std::conditional_t<TX == ffi::DataType::F32, float, uint16_t>;
  using W = std::conditional_t<TW == ffi::DataType::F32, float, uint16_t>;
  return Product(pool, reinterpret_cast<const X*>(x.untyped_data()),
                 reinterpret_cast<const W*>(w.untyped_data()), xd[0], xd[1], wd[0],
                 y->typed_data());
}

// out[n] = table[ids[n]] for a bf16 table (as any 2-byte type), ids
// clamped to the table as XLA's gather does. XLA's CPU backend widens a
// bf16 table to gather from it, and in a decode loop hoists that widening
// out as loop-invariant: 2 GB written per generate call at 3B.
ffi::Error GatherImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids,
                      ffi::Result<ffi::AnyBuffer> out) {
  auto td = table.dimensions();
  if (td.size() != 2 || ffi::ByteWidth(table.element_type()) != 2)
    return ffi::Error::InvalidArgument("gather: want a 2-byte table [V, D]");
  const int64_t V = td[0], D = td[1], n = ids.element_count();
  const auto* src = static_cast<const uint16_t*>(table.untyped_data());
  auto* dst = static_cast<uint16_t*>(out->untyped_data());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = std::clamp<int64_t>(ids.typed_data()[i], 0, V - 1);
    std::copy(src + id * D, src + (id + 1) * D, dst + i * D);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gather16, GatherImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsF32, (Impl<ffi::F32, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsBF16, (Impl<ffi::F32, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#ifdef __AVX512BF16__
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsBF16Dot, (Impl<ffi::BF16, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif
