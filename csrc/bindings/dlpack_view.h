// Turns a DLPack capsule (from torch.utils.dlpack.to_dlpack or __dlpack__) into a TensorView.
#pragma once
#include <pybind11/pybind11.h>

#include "lowbit/tensor_view.h"

namespace lowbit {

// The capsule stays owned by the caller (it must outlive the view); nothing is consumed or freed here.
TensorView view_from_capsule(const pybind11::capsule& capsule, const char* op, const char* arg, bool writable = false);

}  // namespace lowbit
