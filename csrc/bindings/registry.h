// One registration function per op family; module.cpp calls each.
#pragma once
#include <pybind11/pybind11.h>

namespace lowbit {
void register_hadamard(pybind11::module_& m);
}  // namespace lowbit
