// One registration function per op family; module.cpp calls each.
#pragma once
#include <pybind11/pybind11.h>

namespace lowbit {
void register_hadamard(pybind11::module_& m);
void register_pack(pybind11::module_& m);
void register_kv(pybind11::module_& m);
void register_lut_gemm(pybind11::module_& m);
void register_vq_gemm(pybind11::module_& m);
void register_async_dequant(pybind11::module_& m);
// The CUDA emulator's controls, in lowbit._cuda_emu only (csrc/cuda_emu/controls.cpp).
void register_cuda_emulation(pybind11::module_& m);
}  // namespace lowbit
