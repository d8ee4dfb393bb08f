// The CUDA emulator's execution model. A launch runs its blocks one after another on the calling OS thread; a
// block's threads are fibers (fiber.h) that run, in the chosen order, until each reaches a synchronization point:
// - __syncthreads: released when every thread of the block waits at the same barrier; a thread that exited or
//   waits elsewhere makes it an error (a divergent barrier), never a hang.
// - warp operations (__syncwarp, __shfl*_sync): complete when every lane named in the mask is there with the same
//   operation and mask; a named lane that exited, does not exist or waits elsewhere is an error, and so is a
//   shuffle reading a lane outside the mask.
// - cp.async: the source is read when the copy is issued; the shared memory is written then or at the
//   cp.async.wait_group that covers the copy's group, as the order says (lands_at_issue).
// Shared memory is filled with 0xff bytes (NaN) at every block start. A fault (a guard page of a device
// allocation) jumps back to the launch, which throws naming the kernel, block, thread and allocation.
#include <setjmp.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu/fiber.h"
#include "cuda_emu/memory.h"
#include "cuda_emu/scheduler.h"
#include "lowbit/cuda_emu/runtime.h"

namespace lowbit {
namespace emu {

void set_last_error(cudaError_t e);  // runtime.cpp

namespace {

constexpr size_t kMaxSharedPerBlock = 227 << 10;
constexpr size_t kMaxStaticShared = 48 << 10;
constexpr unsigned char kPoison = 0xff;

enum class State : uint8_t { runnable, barrier, warp, exited };

struct CpAsyncCopy {
  void* dst;
  int bytes;
  unsigned char data[16];
};

struct Engine;
struct Thread {
  ThreadCtx ctx;
  Engine* engine = nullptr;
  int index = 0;  // linear index in the block
  Context context;
  State state = State::runnable;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  WarpOp op = WarpOp::sync;
  unsigned mask = 0;
  int operand = 0, width = 32;
  uint64_t value = 0, result = 0;
  std::vector<CpAsyncCopy> uncommitted;
  std::deque<std::vector<CpAsyncCopy>> committed;  // oldest first
};

// Everything a launch needs, kept per OS thread and reused, so that a fault's siglongjmp out of a block
// abandons no object that owns memory.
struct Engine {
  std::vector<std::unique_ptr<FiberStack>> stacks;
  std::vector<Thread> threads;
  std::vector<int> order, block_order;
  Context scheduler;
  Thread* current = nullptr;
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  std::unique_ptr<unsigned char[]> shared_raw;
  unsigned char* shared = nullptr;  // 16-byte aligned
  size_t dynamic_bytes = 0, static_used = 0, poisoned = 0;
  uint64_t serial = 0;  // unique per block run (shared-memory slots key on it)
  // Salts of the random schedule, counted from the last set_schedule (epoch) so that a seed replays: launches,
  // blocks run, rounds between synchronization points, cp.async copies.
  uint64_t epoch = 0, launches = 0, blocks = 0, rounds = 0, copies = 0;
  std::string error;  // set by a fiber that failed; the scheduler throws it
};

// The engine of this OS thread (the scheduler's side; the emulated threads reach theirs through their stack).
thread_local Engine t_engine;
Engine& engine() { return t_engine; }
std::atomic<uint64_t> g_serial{0};
std::atomic<int> g_order{int(Order::forward)};
std::atomic<uint64_t> g_seed{0};
std::atomic<uint64_t> g_epoch{0};
std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_barriers{0}, g_warp_ops{0}, g_copies{0};

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void arrange(std::vector<int>& v, size_t n, uint64_t salt) {
  v.resize(n);
  std::iota(v.begin(), v.end(), 0);
  const Order order = Order(g_order.load());
  if (order == Order::reverse) {
    std::reverse(v.begin(), v.end());
  } else if (order == Order::random) {
    uint64_t s = splitmix(g_seed.load() ^ splitmix(salt));
    for (size_t i = n; i > 1; --i) {
      s = splitmix(s);
      std::swap(v[i - 1], v[size_t(s % i)]);
    }
  }
}

std::string dims(const uint3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string where(const Thread& t) {
  return std::string("kernel ") + engine().kernel + ", block " + dims(t.ctx.block_idx) + ", thread " +
         dims(t.ctx.thread_idx);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::shfl_idx: return "__shfl_sync";
    case WarpOp::shfl_up: return "__shfl_up_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
  }
  return "?";
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// The emulated thread calling (from its own stack).
Thread& running() { return *static_cast<Thread*>(this_fiber().thread); }

void suspend(Thread& t) { switch_context(t.context, t.engine->scheduler); }

// Ends the running thread with an error (thrown by the scheduler: an exception cannot cross a fiber switch).
[[noreturn]] void fail(const std::string& message) {
  Thread& t = running();
  if (t.engine->error.empty()) t.engine->error = message + " (" + where(t) + ")";
  t.state = State::exited;
  suspend(t);
  __builtin_unreachable();
}

void fiber_main(void*) {
  std::string error;  // an exception cannot unwind past the fiber's first frame: caught, then reported
  try {
    (*running().engine->body)();
  } catch (const std::exception& ex) {
    error = ex.what();
  }
  if (!error.empty()) fail("exception in an emulated thread: " + error);
  Thread& t = running();
  t.state = State::exited;
  suspend(t);
  __builtin_unreachable();
}

// When a cp.async lands in shared memory: at the wait that covers it (forward: the latest CUDA allows), at issue
// (reverse: the earliest), or either (random: a seeded coin per copy). Late landing makes a stage read before its
// wait read stale data or poison; early landing makes a stage refilled while other threads still read it change
// what they read.
bool lands_at_issue(Engine& e) {
  switch (Order(g_order.load())) {
    case Order::forward: return false;
    case Order::reverse: return true;
    case Order::random: return splitmix(g_seed.load() ^ splitmix(++e.copies)) & 1;
  }
  return false;
}

void apply(const std::vector<CpAsyncCopy>& group) {
  for (const CpAsyncCopy& c : group) std::memcpy(c.dst, c.data, size_t(c.bytes));
}

// The source lane lane j of a complete group reads (CUDA's rules for each shuffle), or -1 for __syncwarp.
int source_lane(const Thread& t, int j) {
  const int segment = j & ~(t.width - 1);
  switch (t.op) {
    case WarpOp::sync: return -1;
    case WarpOp::shfl_idx: return segment + (t.operand & (t.width - 1));
    case WarpOp::shfl_up: return j - t.operand < segment ? j : j - t.operand;
    case WarpOp::shfl_down: return j + t.operand >= segment + t.width ? j : j + t.operand;
    case WarpOp::shfl_xor: {
      const int s = j ^ t.operand;
      return s >= segment + t.width ? j : s;
    }
  }
  return j;
}

// Whether lane `lane` of warp w waits at the same warp operation as `leader`.
bool joins(const Thread& leader, int w, int lane) {
  const size_t i = size_t(w * 32 + lane);
  if (i >= engine().threads.size()) return false;
  const Thread& t = engine().threads[i];
  return t.state == State::warp && t.op == leader.op && t.mask == leader.mask && t.width == leader.width;
}

// Why lane `lane` of warp w cannot join the group of `leader` (it does not, see joins).
std::string lane_problem(const Thread& leader, int w, int lane) {
  Engine& e = engine();
  const int i = w * 32 + lane;
  const std::string who = "lane " + std::to_string(lane) + " of warp " + std::to_string(w);
  if (i >= int(e.threads.size()))
    return who + " does not exist (the block has " + std::to_string(e.threads.size()) + " threads)";
  const Thread& t = e.threads[size_t(i)];
  switch (t.state) {
    case State::exited: return who + " has exited";
    case State::barrier:
      return who + " waits at __syncthreads (" + t.barrier_file + ":" + std::to_string(t.barrier_line) + ")";
    case State::runnable: return who + " has not arrived";
    case State::warp: break;
  }
  return who + " is at " + op_name(t.op) + " with mask " + hex(t.mask);
}

// Completes every warp operation whose lanes are all there; returns whether any completed. Throws when a group
// can never complete.
bool resolve_warps(bool stuck) {
  Engine& e = engine();
  bool progress = false;
  const int n = int(e.threads.size());
  for (int w = 0; w * 32 < n; ++w) {
    unsigned done = 0;
    for (int lane = 0; lane < 32 && w * 32 + lane < n; ++lane) {
      const Thread& leader = e.threads[size_t(w * 32 + lane)];
      if (leader.state != State::warp || (done >> lane & 1u)) continue;
      int absent = -1;
      for (int j = 0; j < 32 && absent < 0; ++j)
        if ((leader.mask >> j & 1u) && !joins(leader, w, j)) absent = j;
      if (absent >= 0) {
        if (stuck)
          throw std::runtime_error(std::string("CUDA emulation: ") + op_name(leader.op) + " with mask " +
                                   hex(leader.mask) + " can never complete: " + lane_problem(leader, w, absent) +
                                   " (" + where(leader) + ")");
        continue;
      }
      for (int j = 0; j < 32; ++j) {
        if (!(leader.mask >> j & 1u)) continue;
        Thread& t = e.threads[size_t(w * 32 + j)];
        const int src = source_lane(t, j);
        if (src >= 0 && src != j && !(leader.mask >> src & 1u))
          throw std::runtime_error(std::string("CUDA emulation: ") + op_name(t.op) + " with mask " + hex(t.mask) +
                                   ": lane " + std::to_string(j) + " reads lane " + std::to_string(src) +
                                   ", which is not in the mask (" + where(t) + ")");
        t.result = src < 0 ? 0 : e.threads[size_t(w * 32 + src)].value;
      }
      for (int j = 0; j < 32; ++j)
        if (leader.mask >> j & 1u) e.threads[size_t(w * 32 + j)].state = State::runnable;
      done |= leader.mask;
      progress = true;
      ++g_warp_ops;
    }
  }
  return progress;
}

// Releases a barrier that every live thread waits at; throws for a divergent one.
void release_barrier() {
  Engine& e = engine();
  const Thread* first = nullptr;
  size_t exited = 0, waiting = 0;
  for (const Thread& t : e.threads) {
    if (t.state == State::exited) ++exited;
    if (t.state != State::barrier) continue;
    ++waiting;
    if (!first) {
      first = &t;
    } else if (t.barrier_line != first->barrier_line || std::strcmp(t.barrier_file, first->barrier_file) != 0) {
      throw std::runtime_error("CUDA emulation: divergent __syncthreads: threads wait at " +
                               std::string(first->barrier_file) + ":" + std::to_string(first->barrier_line) +
                               " and at " + t.barrier_file + ":" + std::to_string(t.barrier_line) + " (" +
                               where(t) + ")");
    }
  }
  if (exited)
    throw std::runtime_error("CUDA emulation: __syncthreads at " + std::string(first->barrier_file) + ":" +
                             std::to_string(first->barrier_line) + " is reached by " + std::to_string(waiting) +
                             " of " + std::to_string(e.threads.size()) + " threads; " + std::to_string(exited) +
                             " exited before it (" + where(*first) + ")");
  for (Thread& t : e.threads) t.state = State::runnable;
  ++g_barriers;
}

void run_block(const dim3& grid, const dim3& block, unsigned linear_block) {
  Engine& e = engine();
  e.serial = ++g_serial;
  ++e.blocks;
  e.static_used = 0;
  e.poisoned = std::max(e.poisoned, e.dynamic_bytes);
  std::memset(e.shared, kPoison, e.poisoned);
  const uint3 bidx{linear_block % grid.x, linear_block / grid.x % grid.y, linear_block / (grid.x * grid.y)};
  const size_t n = size_t(block.x) * block.y * block.z;
  for (size_t i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.ctx.thread_idx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (block.x * block.y))};
    t.ctx.block_idx = bidx;
    t.ctx.block_dim = block;
    t.ctx.grid_dim = grid;
    t.index = int(i);
    t.engine = &e;
    t.state = State::runnable;
    t.uncommitted.clear();
    t.committed.clear();
    *static_cast<FiberHeader*>(e.stacks[i]->header()) = FiberHeader{&t.ctx, &e.serial, &t};
    make_context(t.context, *e.stacks[i], fiber_main, nullptr, e.scheduler);
  }
  for (;;) {
    arrange(e.order, n, e.blocks * 0x100000001b3ull + e.rounds++);
    for (int i : e.order) {
      Thread& t = e.threads[size_t(i)];
      if (t.state != State::runnable) continue;
      e.current = &t;
      switch_context(e.scheduler, t.context);
      e.current = nullptr;
      if (!e.error.empty()) throw std::runtime_error("CUDA emulation: " + e.error);
    }
    if (resolve_warps(false)) continue;
    bool at_warp = false, at_barrier = false;
    for (const Thread& t : e.threads) {
      at_warp |= t.state == State::warp;
      at_barrier |= t.state == State::barrier;
    }
    if (at_warp) resolve_warps(true);  // throws: nothing can complete
    if (!at_barrier) return;           // every thread exited
    release_barrier();
  }
}

void prepare(size_t threads) {
  Engine& e = engine();
  while (e.stacks.size() < threads) e.stacks.push_back(std::make_unique<FiberStack>(kFiberRegionBytes));
  e.threads.resize(threads);
  if (!e.shared) {
    e.shared_raw.reset(new unsigned char[kMaxSharedPerBlock + 16]);
    e.shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(e.shared_raw.get()) + 15) & ~uintptr_t(15));
  }
}

std::string describe_fault(const Fault& f) {
  Engine& e = engine();
  std::string what = allocation_fault(f.addr, f.write);
  for (size_t i = 0; what.empty() && i < e.threads.size(); ++i)
    if (e.stacks[i]->guards(f.addr)) what = "stack overflow of an emulated thread";
  if (what.empty()) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%s invalid address %p", f.write ? "wrote to" : "read from", f.addr);
    what = buf;
  }
  return "CUDA emulation: " + what + " (" + (e.current ? where(*e.current) : std::string("kernel ") + e.kernel) + ")";
}

}  // namespace


void syncthreads(const char* file, int line) {
  Thread& t = running();
  t.state = State::barrier;
  t.barrier_file = file;
  t.barrier_line = line;
  suspend(t);
}

uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t value, int operand, int width) {
  Thread& t = running();
  const int lane = t.index % 32;
  if (!(mask >> lane & 1u)) fail(std::string(op_name(op)) + " with mask " + hex(mask) + " called by lane " +
                                 std::to_string(lane) + ", which the mask does not name");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(std::string(op_name(op)) + " with width " + std::to_string(width) + " (a power of 2 up to 32)");
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.operand = operand & 31;  // shfl.sync reads lane / delta / mask from the operand's 5 low bits
  t.width = width;
  t.state = State::warp;
  suspend(t);
  return t.result;
}

void async_copy(void* dst, const void* src, int bytes) {
  Engine& e = *running().engine;
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < e.shared || d + bytes > e.shared + kMaxSharedPerBlock) fail("cp.async to an address outside shared memory");
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % unsigned(bytes))
    fail("cp.async of " + std::to_string(bytes) + " bytes with a misaligned address");
  ++g_copies;
  if (lands_at_issue(e)) {
    std::memcpy(dst, src, size_t(bytes));
    return;
  }
  CpAsyncCopy c{dst, bytes, {}};
  std::memcpy(c.data, src, size_t(bytes));
  running().uncommitted.push_back(c);
}

void async_copy_commit() {
  Thread& t = running();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void async_copy_wait(int pending) {
  Thread& t = running();
  while (t.committed.size() > size_t(pending)) {
    apply(t.committed.front());
    t.committed.pop_front();
  }
}

void* dynamic_shared() { return running().engine->shared; }

void* static_shared(size_t bytes, size_t align) {
  Engine& e = *running().engine;
  const size_t a = std::max<size_t>(align, 16);
  const size_t offset = (e.dynamic_bytes + e.static_used + a - 1) / a * a;
  if (offset - e.dynamic_bytes + bytes > kMaxStaticShared || offset + bytes > kMaxSharedPerBlock)
    fail("static __shared__ memory over the limit (" + std::to_string(offset + bytes) + " bytes)");
  e.static_used = offset + bytes - e.dynamic_bytes;
  if (offset + bytes > e.poisoned) {
    std::memset(e.shared + e.poisoned, kPoison, offset + bytes - e.poisoned);
    e.poisoned = offset + bytes;
  }
  return e.shared + offset;
}

void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (dynamic_shared_bytes > size_t(max_dynamic_shared(kernel))) {
    set_last_error(cudaErrorInvalidValue);
    return;
  }
  Engine& e = engine();
  prepare(size_t(threads));
  e.kernel = name;
  e.body = &body;
  e.dynamic_bytes = dynamic_shared_bytes;
  e.error.clear();
  e.current = nullptr;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  ++g_launches;
  g_blocks += blocks;
  g_threads += blocks * threads;
  if (e.epoch != g_epoch.load()) {
    e.epoch = g_epoch.load();
    e.launches = e.blocks = e.rounds = e.copies = 0;
  }
  arrange(e.block_order, size_t(blocks), ~++e.launches);
  static thread_local sigjmp_buf jump;
  if (sigsetjmp(jump, 1)) {
    disarm_fault_jump();
    const std::string message = describe_fault(last_fault());
    e.current = nullptr;
    throw std::runtime_error(message);
  }
  arm_fault_jump(&jump);
  try {
    for (int b : e.block_order) run_block(grid, block, unsigned(b));
  } catch (...) {
    disarm_fault_jump();
    e.current = nullptr;
    throw;
  }
  disarm_fault_jump();
}

void set_schedule(Order order, uint64_t seed) {
  g_order = int(order);
  g_seed = seed;
  ++g_epoch;
}
Order schedule_order() { return Order(g_order.load()); }
uint64_t schedule_seed() { return g_seed.load(); }

Counters counters() {
  return Counters{g_launches, g_blocks, g_threads, g_barriers, g_warp_ops, g_copies};
}
void reset_counters() { g_launches = g_blocks = g_threads = g_barriers = g_warp_ops = g_copies = 0; }

}  // namespace emu
}  // namespace lowbit
