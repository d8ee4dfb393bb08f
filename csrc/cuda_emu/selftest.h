// Kernels with planted bugs (and their correct twins) that the emulator's own tests run: each bug must be
// caught. Built into lowbit._cuda_emu only.
#pragma once
#include <string>

#include "lowbit/tensor_view.h"

namespace lowbit {
namespace emu {

// Runs the named self-test kernel over x and out (float32, 64 elements each, one block of 64 threads).
void run_selftest(const std::string& name, const TensorView& x, const TensorView& out);

}  // namespace emu
}  // namespace lowbit
