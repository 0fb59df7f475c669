// CUDA on the CPU, for the kernels TVM generates: enough of the CUDA C++ device language to
// compile TVM's CUDA source with g++ and run each kernel on this machine (source.py rewrites
// the few constructs that cannot be defined here: inline PTX and __shared__ declarations).
//
// Every CUDA thread of a block is a fiber (ucontext) and runs until it waits: at
// __syncthreads, at a warp shuffle, or at its end. A block's fibers are resumed in turn
// until all have ended; blocks are spread over the cores, one after another on each. A wait
// nobody can end (a barrier some threads never reach) is reported, not hung on. The threads
// can be resumed first to last or last to first: a result that differs between the two
// orders has a missing barrier. What is checked beside the results:
// - barriers: every thread of a block must reach each __syncthreads, every lane of a
//   shuffle's mask each shuffle;
// - cp.async: copies land only when a cp.async.wait_group lets them (as late as the
//   hardware may; those of a thread that ends without waiting never), so that a read of
//   shared memory before its wait sees stale bytes; both addresses must be 16-byte aligned;
// - WMMA: each lane of a warp computes and stores only its share of a 16x16 accumulator
//   (as on the hardware, where a fragment is spread over the lanes), so that a store not
//   made by every lane leaves holes; pointers must be 32-byte aligned and strides whole
//   16-byte rows;
// - shared memory starts filled with NaN bytes in every block; vector loads and stores of
//   misaligned addresses are caught by -fsanitize=alignment (the vector types carry
//   CUDA's alignment).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <algorithm>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

namespace emu {
struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
}  // namespace emu

// Set by the scheduler before each fiber resumes; one set per worker thread (blocks run on
// several cores, each worker with its own fibers and shared memory).
inline thread_local emu::Index3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* format, ...);

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kDynamicSharedBytes = 228 * 1024;  // an H100/H200 SM's shared memory
constexpr size_t kStaticSharedBytes = 48 * 1024;    // CUDA's limit on static __shared__ arrays
constexpr size_t kSharedBytes = kDynamicSharedBytes + kStaticSharedBytes;

struct Barrier {
  int arrived = 0;
  unsigned long generation = 0;
};

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t context;
  Index3 thread;
  int linear = 0;
  bool done = false;
  Barrier* waiting_on = nullptr;
  unsigned long waiting_generation = 0;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> committed;
};

struct Warp {
  Barrier barrier;
  unsigned char slots[kWarp][16];
};

struct Launch {
  void (*body)(void**) = nullptr;
  void** args = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block_barrier;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  unsigned char* shared = nullptr;  // kSharedBytes at a 1024-byte boundary
  size_t shared_used = 0;
  std::map<int, size_t> static_shared;
};

inline thread_local Launch* launch_state = nullptr;
// Threads resumed last to first: a kernel whose result depends on the order its threads
// run between barriers (a missing barrier) gives different results in the two orders.
inline bool reverse_order = false;

// Fiber stacks, mapped once and reused by every launch (pages are touched only when used).
inline thread_local std::vector<void*> stack_pool;

inline void* stack(int index) {
  while (int(stack_pool.size()) <= index) {
    void* mapping = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) fail("cannot map a fiber stack");
    stack_pool.push_back(mapping);
  }
  return stack_pool[index];
}

inline Fiber& current() { return *launch_state->current; }
inline int lane() { return current().linear % kWarp; }
inline int warp_index() { return current().linear / kWarp; }
inline int block_threads() { return int(launch_state->fibers.size()); }

// Wait until `expected` fibers have arrived at `barrier`; the last to arrive goes on at once.
inline void arrive(Barrier& barrier, int expected) {
  if (++barrier.arrived == expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& fiber = current();
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = barrier.generation;
  swapcontext(&fiber.context, &launch_state->scheduler);
}

inline unsigned live_lanes() {
  const int first = warp_index() * kWarp;
  unsigned mask = 0;
  for (int lane_index = 0; lane_index < kWarp; ++lane_index) {
    const int linear = first + lane_index;
    if (linear < block_threads() && !launch_state->fibers[linear].done) mask |= 1u << lane_index;
  }
  return mask;
}

// --- shared memory -------------------------------------------------------------------------

inline unsigned char* dynamic_shared() { return launch_state->shared; }

// A `__shared__ T name[n]` declaration (numbered by source.py): the same bytes for every
// thread of a block, placed after the block's dynamic shared memory (apart from it, as on
// the hardware).
inline void* static_shared(int id, size_t bytes) {
  Launch& state = *launch_state;
  auto found = state.static_shared.find(id);
  if (found != state.static_shared.end()) return state.shared + found->second;
  const size_t offset = (state.shared_used + 127) / 128 * 128;
  if (offset + bytes > kSharedBytes) fail("more than %zu bytes of static shared memory", kStaticSharedBytes);
  state.static_shared[id] = offset;
  state.shared_used = offset + bytes;
  return state.shared + offset;
}

// --- asynchronous copies (cp.async) ------------------------------------------------------

inline void cp_async(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async of %d bytes from %p to %p: both addresses must be %d-byte aligned", bytes, src, dst, bytes);
  current().uncommitted.push_back({dst, src, bytes});
}

inline void cp_async_commit() {
  Fiber& fiber = current();
  fiber.committed.push_back(std::move(fiber.uncommitted));
  fiber.uncommitted.clear();
}

inline void land(std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& copy : copies) std::memcpy(copy.dst, copy.src, copy.bytes);
  copies.clear();
}

// cp.async.wait_group n: all but the n most recent committed groups have landed.
inline void cp_async_wait(int pending) {
  Fiber& fiber = current();
  while (int(fiber.committed.size()) > pending) {
    land(fiber.committed.front());
    fiber.committed.pop_front();
  }
}

// --- scheduling ----------------------------------------------------------------------------

inline void fiber_main() {
  Launch& state = *launch_state;
  state.body(state.args);
  Fiber& fiber = current();
  // Copies no wait covered are dropped: whoever reads them reads without a wait.
  fiber.committed.clear();
  fiber.uncommitted.clear();
  fiber.done = true;
  swapcontext(&fiber.context, &state.scheduler);
}

inline std::string describe_wait(const Launch& state) {
  int at_block = 0, at_warp = 0, ended = 0;
  for (const Fiber& fiber : state.fibers) {
    if (fiber.done) ++ended;
    else if (fiber.waiting_on == &state.block_barrier) ++at_block;
    else ++at_warp;
  }
  char text[256];
  std::snprintf(text, sizeof text,
                "deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp "
                "shuffle, %d have ended (every thread must reach every barrier)",
                blockIdx.x, blockIdx.y, blockIdx.z, at_block, at_warp, ended);
  return text;
}

inline void run_block(Launch& state) {
  const int threads = block_threads();
  for (int linear = 0; linear < threads; ++linear) {
    Fiber& fiber = state.fibers[linear];
    fiber.done = false;
    fiber.waiting_on = nullptr;
    fiber.uncommitted.clear();
    fiber.committed.clear();
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stack(linear);
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_main, 0);
  }
  std::memset(state.shared, 0xff, kSharedBytes);  // NaN in every float type
  state.shared_used = kDynamicSharedBytes;
  state.static_shared.clear();
  state.block_barrier = Barrier();
  for (Warp& warp : state.warps) warp.barrier = Barrier();
  for (;;) {
    int ended = 0;
    bool resumed = false;
    for (int turn = 0; turn < threads; ++turn) {
      Fiber& fiber = state.fibers[reverse_order ? threads - 1 - turn : turn];
      if (fiber.done) {
        ++ended;
        continue;
      }
      if (fiber.waiting_on && fiber.waiting_on->generation == fiber.waiting_generation) continue;
      fiber.waiting_on = nullptr;
      state.current = &fiber;
      threadIdx = fiber.thread;
      swapcontext(&state.scheduler, &fiber.context);
      resumed = true;
    }
    if (ended == threads) return;
    if (!resumed) fail("%s", describe_wait(state).c_str());
  }
}

// One worker's share of a launch: blocks worker, worker + workers, ... in order.
inline void run_blocks(void (*body)(void**), void** args, Index3 grid, Index3 block, unsigned worker,
                       unsigned workers) {
  Launch state;
  state.body = body;
  state.args = args;
  const int threads = int(block.x * block.y * block.z);
  state.fibers.resize(threads);
  state.warps.resize((threads + kWarp - 1) / kWarp);
  state.shared = static_cast<unsigned char*>(std::aligned_alloc(1024, kSharedBytes));
  for (int linear = 0; linear < threads; ++linear) {
    state.fibers[linear].linear = linear;
    state.fibers[linear].thread = {unsigned(linear % block.x), unsigned(linear / block.x % block.y),
                                   unsigned(linear / (block.x * block.y))};
  }
  launch_state = &state;
  blockDim = block;
  gridDim = grid;
  const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
  for (unsigned long index = worker; index < blocks; index += workers) {
    blockIdx = {unsigned(index % grid.x), unsigned(index / grid.x % grid.y), unsigned(index / grid.x / grid.y)};
    run_block(state);
  }
  launch_state = nullptr;
  std::free(state.shared);
}

// Blocks share nothing but global memory, and a correct kernel's blocks do not depend on
// one another's writes: they run on every core, in no fixed order between workers.
inline void launch(void (*body)(void**), void** args, Index3 grid, Index3 block) {
  const int threads = int(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) fail("a block of %d threads (CUDA allows 1 to 1024)", threads);
  const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
  const unsigned workers = unsigned(std::min<unsigned long>(blocks, std::max(1u, std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (unsigned worker = 1; worker < workers; ++worker)
    pool.emplace_back(run_blocks, body, args, grid, block, worker, workers);
  run_blocks(body, args, grid, block, 0, workers);
  for (std::thread& thread : pool) thread.join();
}

}  // namespace emu

inline void __syncthreads() { emu::arrive(emu::launch_state->block_barrier, emu::block_threads()); }

inline unsigned __activemask() { return emu::live_lanes(); }

namespace emu {

enum class Shuffle { index, down, up, xor_ };

// A warp shuffle: every lane of `mask` puts its value in the warp's slots, waits for the
// others, reads its source lane's value, and waits again before the slots are reused.
template <class T>
T shuffle(unsigned mask, T value, Shuffle kind, int argument, int width) {
  static_assert(sizeof(T) <= 16, "a shuffle moves at most 16 bytes");
  const int me = lane();
  if (!(mask >> me & 1)) fail("lane %d runs a shuffle whose mask 0x%08x leaves it out", me, mask);
  if (width < 1 || width > kWarp || (width & (width - 1))) fail("shuffle width %d", width);
  Warp& warp = launch_state->warps[warp_index()];
  std::memcpy(warp.slots[me], &value, sizeof(T));
  const int expected = __builtin_popcount(mask);
  arrive(warp.barrier, expected);
  const int segment = me / width * width, position = me % width;
  int source = me;
  switch (kind) {
    case Shuffle::index: source = segment + ((argument % width) + width) % width; break;
    case Shuffle::down: if (position + argument < width) source = me + argument; break;
    case Shuffle::up: if (position >= argument) source = me - argument; break;
    case Shuffle::xor_: if (((me ^ argument) / width) == (me / width)) source = me ^ argument; break;
  }
  T result;
  if (!(mask >> source & 1)) {
    std::memset(&result, 0xff, sizeof(T));  // undefined on the hardware: NaN here
  } else {
    std::memcpy(&result, warp.slots[source], sizeof(T));
  }
  arrive(warp.barrier, expected);
  return result;
}

}  // namespace emu

template <class T>
T __shfl_sync(unsigned mask, T value, int lane, int width = 32) {
  return emu::shuffle(mask, value, emu::Shuffle::index, lane, width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return emu::shuffle(mask, value, emu::Shuffle::down, int(delta), width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return emu::shuffle(mask, value, emu::Shuffle::up, int(delta), width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return emu::shuffle(mask, value, emu::Shuffle::xor_, lane_mask, width);
}

// --- half precision ------------------------------------------------------------------------
// Each operation rounds to half, as the hardware's half instructions do.

struct __half {
  _Float16 value;
  __half() = default;
  __half(float v) : value(_Float16(v)) {}
  __half(double v) : value(_Float16(float(v))) {}
  __half(int v) : value(_Float16(float(v))) {}
  __half(unsigned v) : value(_Float16(float(v))) {}
  __half(long v) : value(_Float16(float(v))) {}
  __half(long long v) : value(_Float16(float(v))) {}
  operator float() const { return float(value); }
  __half& operator+=(__half o) { return *this = __half(float(*this) + float(o)); }
  __half& operator-=(__half o) { return *this = __half(float(*this) - float(o)); }
  __half& operator*=(__half o) { return *this = __half(float(*this) * float(o)); }
  __half& operator/=(__half o) { return *this = __half(float(*this) / float(o)); }
};
using half = __half;

inline __half operator+(__half a, __half b) { return __half(float(a) + float(b)); }
inline __half operator-(__half a, __half b) { return __half(float(a) - float(b)); }
inline __half operator*(__half a, __half b) { return __half(float(a) * float(b)); }
inline __half operator/(__half a, __half b) { return __half(float(a) / float(b)); }
inline __half operator-(__half a) { return __half(-float(a)); }
inline bool operator<(__half a, __half b) { return float(a) < float(b); }
inline bool operator>(__half a, __half b) { return float(a) > float(b); }
inline bool operator<=(__half a, __half b) { return float(a) <= float(b); }
inline bool operator>=(__half a, __half b) { return float(a) >= float(b); }
inline bool operator==(__half a, __half b) { return float(a) == float(b); }
inline bool operator!=(__half a, __half b) { return float(a) != float(b); }

inline __half __float2half(float v) { return __half(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline float __half2float(__half v) { return float(v); }
inline bool __hgt(__half a, __half b) { return a > b; }
inline bool __hlt(__half a, __half b) { return a < b; }
inline __half hexp(__half v) { return __half(std::exp(float(v))); }
inline __half hlog(__half v) { return __half(std::log(float(v))); }
inline __half hsqrt(__half v) { return __half(std::sqrt(float(v))); }
inline __half hrsqrt(__half v) { return __half(1.0f / std::sqrt(float(v))); }
inline __half htanh(__half v) { return __half(std::tanh(float(v))); }
inline __half herf(__half v) { return __half(std::erf(float(v))); }
inline __half __habs(__half v) { return __half(std::fabs(float(v))); }

struct alignas(4) __half2 {
  __half x, y;
};
using half2 = __half2;
inline __half2 make_half2(__half x, __half y) { return __half2{x, y}; }

// --- vector types (CUDA's alignment: a misaligned vector access is a fault there) ---------

#define EMU_VECTOR2(name, T, align)                                                   \
  struct alignas(align) name { T x, y; };                                          \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define EMU_VECTOR3(name, T)                                                          \
  struct name { T x, y, z; };                                                      \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define EMU_VECTOR4(name, T, align)                                                   \
  struct alignas(align) name { T x, y, z, w; };                                    \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

struct alignas(4) float1 { float x; };
struct alignas(4) int1 { int x; };
struct alignas(4) uint1 { unsigned x; };
inline uint1 make_uint1(unsigned x) { return uint1{x}; }
EMU_VECTOR2(float2, float, 8)
EMU_VECTOR4(float4, float, 16)
EMU_VECTOR2(int2, int, 8)
EMU_VECTOR4(int4, int, 16)
EMU_VECTOR2(uint2, unsigned, 8)
EMU_VECTOR4(uint4, unsigned, 16)
EMU_VECTOR2(char2, signed char, 2)
EMU_VECTOR4(char4, signed char, 4)
EMU_VECTOR4(uchar4, unsigned char, 4)
EMU_VECTOR2(double2, double, 16)
EMU_VECTOR3(float3, float)
EMU_VECTOR3(int3, int)
#undef EMU_VECTOR2
#undef EMU_VECTOR3
#undef EMU_VECTOR4

// --- math ----------------------------------------------------------------------------------

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

// --- WMMA (nvcuda::wmma) -------------------------------------------------------------------
// A fragment has room for its whole matrix in each lane; an accumulator's elements are owned
// by the lanes in row-major runs of M*N/32, and only the owner loads, computes and stores
// them (and reads the rows of A and columns of B they need).

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = shape<Use, M, N, K>::rows, cols = shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

inline void check_pointer(const void* pointer, unsigned ldm, size_t element_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32)
    emu::fail("wmma::%s at %p: the address must be 32-byte aligned", what, pointer);
  if ((ldm * element_bytes) % 16)
    emu::fail("wmma::%s with a stride of %u elements: it must be a multiple of 16 bytes", what, ldm);
}

// The accumulator elements this lane owns: [first, first + share) in row-major order.
template <int M, int N>
struct LaneShare {
  static constexpr int share = M * N / emu::kWarp;
  int first = emu::lane() * share;
  int first_row() const { return first / N; }
  int last_row() const { return (first + share - 1) / N; }
  bool owns_column(int c) const {  // of the rows it owns (a run within a row, or whole rows)
    return share >= N || (c >= first % N && c < first % N + share);
  }
};

// A lane reads what its share of the product needs: its rows of A, its columns of B.
template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* pointer, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_pointer(pointer, ldm, sizeof(P), "load_matrix_sync");
  constexpr bool column_major = std::is_same<Layout, col_major>::value;
  constexpr bool is_a = std::is_same<Use, matrix_a>::value;
  const LaneShare<M, N> mine;
  for (int r = 0; r < F::rows; ++r) {
    if (is_a && (r < mine.first_row() || r > mine.last_row())) continue;
    for (int c = 0; c < F::cols; ++c) {
      if (!is_a && !mine.owns_column(c)) continue;
      f.x[r * F::cols + c] = T(column_major ? pointer[c * ldm + r] : pointer[r * ldm + c]);
    }
  }
}

template <int M, int N, int K, class T, class P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* pointer, unsigned ldm, layout_t layout) {
  check_pointer(pointer, ldm, sizeof(P), "load_matrix_sync");
  const LaneShare<M, N> mine;
  for (int e = mine.first; e < mine.first + mine.share; ++e) {
    const int r = e / N, c = e % N;
    f.x[e] = T(layout == mem_col_major ? pointer[c * ldm + r] : pointer[r * ldm + c]);
  }
}

template <class Use, int M, int N, int K, class T, class Layout, class V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V value) {
  for (auto& element : f.x) element = T(value);
}

template <int M, int N, int K, class TD, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  const LaneShare<M, N> mine;
  constexpr int share = LaneShare<M, N>::share;
  const int first = mine.first;
  float result[share];
  for (int e = 0; e < share; ++e) {
    const int r = (first + e) / N, col = (first + e) % N;
    float sum = float(c.x[r * N + col]);
    for (int k = 0; k < K; ++k) sum += float(a.x[r * K + k]) * float(b.x[k * N + col]);
    result[e] = sum;
  }
  for (int e = 0; e < share; ++e) d.x[first + e] = TD(result[e]);
}

template <int M, int N, int K, class T, class P>
void store_matrix_sync(P* pointer, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_pointer(pointer, ldm, sizeof(P), "store_matrix_sync");
  const LaneShare<M, N> mine;
  for (int e = mine.first; e < mine.first + mine.share; ++e) {
    const int r = e / N, c = e % N;
    (layout == mem_col_major ? pointer[c * ldm + r] : pointer[r * ldm + c]) = P(f.x[e]);
  }
}

}  // namespace wmma
}  // namespace nvcuda

// --- the program: launches read from stdin -------------------------------------------------
//
//   buffer <id> <bytes> <file>     read into a buffer at a 256-byte boundary; written back
//   order forward|reverse           the order a block's threads are resumed in (forward first)
//   launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <buffer id>...
//
// Exit 0 when every launch ran; else 3 with one line on stderr.

namespace emu {

struct Kernel {
  const char* name;
  void (*body)(void**);
  int parameters;
};

[[noreturn]] inline void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "cuda emulator: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::fflush(stderr);
  std::_Exit(3);  // other workers may still be running: no exit handlers
}

struct Buffer {
  std::string file;
  size_t bytes = 0;
  unsigned char* data = nullptr;
};

inline int main(const Kernel* kernels, int kernel_count) {
  std::map<int, Buffer> buffers;
  char word[64];
  while (std::scanf("%63s", word) == 1) {
    if (!std::strcmp(word, "buffer")) {
      int id;
      size_t bytes;
      char file[4096];
      if (std::scanf("%d %zu %4095s", &id, &bytes, file) != 3) fail("bad buffer line");
      Buffer& buffer = buffers[id];
      buffer.file = file;
      buffer.bytes = bytes;
      buffer.data = static_cast<unsigned char*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
      FILE* in = std::fopen(file, "rb");
      if (!in || std::fread(buffer.data, 1, bytes, in) != bytes) fail("cannot read %s", file);
      std::fclose(in);
    } else if (!std::strcmp(word, "order")) {
      char order[16];
      if (std::scanf("%15s", order) != 1) fail("bad order line");
      reverse_order = !std::strcmp(order, "reverse");
    } else if (!std::strcmp(word, "launch")) {
      char name[512];
      Index3 grid, block;
      if (std::scanf("%511s %u %u %u %u %u %u", name, &grid.x, &grid.y, &grid.z, &block.x, &block.y,
                     &block.z) != 7)
        fail("bad launch line");
      const Kernel* kernel = nullptr;
      for (int i = 0; i < kernel_count; ++i)
        if (!std::strcmp(kernels[i].name, name)) kernel = &kernels[i];
      if (!kernel) fail("no kernel %s in this source", name);
      std::vector<void*> args(kernel->parameters);
      for (void*& arg : args) {
        int id;
        if (std::scanf("%d", &id) != 1 || !buffers.count(id)) fail("launch %s: bad buffer id", name);
        arg = buffers[id].data;
      }
      launch(kernel->body, args.data(), grid, block);
    } else {
      fail("unknown line '%s'", word);
    }
  }
  for (auto& [id, buffer] : buffers) {
    FILE* out = std::fopen(buffer.file.c_str(), "wb");
    if (!out || std::fwrite(buffer.data, 1, buffer.bytes, out) != buffer.bytes) fail("cannot write %s", buffer.file.c_str());
    std::fclose(out);
  }
  return 0;
}

}  // namespace emu
