// The pybind11 module lowbit._C: build information, exception mapping and the op families. The same source is
// the test-only lowbit._cuda_emu (LOWBIT_MODULE_NAME), whose CUDA entry points run on the CUDA emulator and
// which adds the emulator's controls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include "bindings/device.h"
#include "bindings/registry.h"
#include "lowbit/cpu_isa.h"
#include "lowbit/tensor_view.h"

#ifndef LOWBIT_VERSION
#define LOWBIT_VERSION "0.0.0"
#endif
#ifndef LOWBIT_CUDA_ARCHS_STR
#define LOWBIT_CUDA_ARCHS_STR ""
#endif
#ifndef LOWBIT_CUDA_COMPILER
#define LOWBIT_CUDA_COMPILER ""
#endif
#ifndef LOWBIT_MODULE_NAME
#define LOWBIT_MODULE_NAME _C
#endif

namespace py = pybind11;

PYBIND11_MODULE(LOWBIT_MODULE_NAME, m) {
  m.doc() = "lowbit native kernels (CPU, and CUDA when built with it)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const lowbit::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
  m.def("cuda_built", &lowbit::cuda_built, "True when the CUDA kernels were compiled in.");
  m.def("cuda_device_count", &lowbit::cuda_device_count, "CUDA devices usable by lowbit (0 without driver).");
  m.def("build_info", []() {
    py::dict d;
    d["version"] = LOWBIT_VERSION;
    d["cxx_compiler"] = LOWBIT_CXX_COMPILER;
    d["cuda"] = lowbit::cuda_built();
    d["cuda_compiler"] = LOWBIT_CUDA_COMPILER;
    d["cuda_archs"] = LOWBIT_CUDA_ARCHS_STR;
    d["cpu_features"] = lowbit::cpu_features();
    d["openmp_threads"] = omp_get_max_threads();
    return d;
  });
  m.def("cpu_isa", []() { return std::string(lowbit::cpu_isa_name()); },
        "The CPU path of the SIMD kernels: avx512, avx2 or scalar.");
  m.def("set_cpu_isa", [](const std::string& name) { return std::string(lowbit::set_cpu_isa(name.c_str())); },
        py::arg("name"), "Forces the CPU path of the SIMD kernels ('' restores the default); returns it.");
  lowbit::register_hadamard(m);
  lowbit::register_pack(m);
  lowbit::register_kv(m);
  lowbit::register_lut_gemm(m);
  lowbit::register_vq_gemm(m);
  lowbit::register_async_dequant(m);
#ifdef LOWBIT_CUDA_EMULATION
  lowbit::register_cuda_emulation(m);
#endif
}
