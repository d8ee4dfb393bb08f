// The CUDA emulator's scheduler settings and counters, for the Python controls (controls.cpp) and tests.
#pragma once
#include <cstdint>
#include <string>

namespace lowbit {
namespace emu {

// The order in which the runnable threads of a block run between two synchronization points (and in which the
// blocks of a grid run): forward, reverse, or a seeded random permutation drawn anew at every point.
enum class Order { forward, reverse, random };
// Sets the order and seed; the random schedule restarts, so the same seed replays the same interleavings.
void set_schedule(Order order, uint64_t seed);
Order schedule_order();
uint64_t schedule_seed();

struct Counters {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_ops = 0, cp_async_copies = 0;
};
Counters counters();
void reset_counters();

}  // namespace emu
}  // namespace lowbit
