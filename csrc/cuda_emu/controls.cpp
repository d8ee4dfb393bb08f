// The CUDA emulator's controls in lowbit._cuda_emu: the thread order, the per-call scope of device copies that
// python/lowbit/ops/cuda_emulation.py opens around every op, counters, the device's attributes, and the
// planted-bug self-tests.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "cuda_emu/memory.h"
#include "cuda_emu/scheduler.h"
#include "cuda_emu/selftest.h"
#include "lowbit/cuda_emu/runtime.h"

namespace py = pybind11;

namespace lowbit {
namespace {

emu::Order parse_order(const std::string& name) {
  if (name == "forward") return emu::Order::forward;
  if (name == "reverse") return emu::Order::reverse;
  if (name == "random") return emu::Order::random;
  throw std::invalid_argument("set_schedule: order must be 'forward', 'reverse' or 'random', got '" + name + "'");
}

const char* order_name(emu::Order order) {
  switch (order) {
    case emu::Order::forward: return "forward";
    case emu::Order::reverse: return "reverse";
    case emu::Order::random: return "random";
  }
  return "?";
}

py::dict device_attributes() {
  py::dict d;
  const std::pair<const char*, cudaDeviceAttr> attrs[] = {
      {"multi_processor_count", cudaDevAttrMultiProcessorCount},
      {"compute_capability_major", cudaDevAttrComputeCapabilityMajor},
      {"compute_capability_minor", cudaDevAttrComputeCapabilityMinor},
      {"max_threads_per_block", cudaDevAttrMaxThreadsPerBlock},
      {"max_shared_memory_per_block_optin", cudaDevAttrMaxSharedMemoryPerBlockOptin},
      {"max_shared_memory_per_multiprocessor", cudaDevAttrMaxSharedMemoryPerMultiprocessor}};
  for (const auto& [name, attr] : attrs) {
    int v = 0;
    cudaDeviceGetAttribute(&v, attr, 0);
    d[name] = v;
  }
  return d;
}

}  // namespace

void register_cuda_emulation(py::module_& m) {
  m.def("set_schedule", [](const std::string& order, uint64_t seed) { emu::set_schedule(parse_order(order), seed); },
        py::arg("order"), py::arg("seed"),
        "The order in which threads run between synchronization points (and blocks run): forward, reverse or "
        "random (seeded).");
  m.def("schedule", []() { return py::make_tuple(order_name(emu::schedule_order()), emu::schedule_seed()); });
  m.def("begin_call", &emu::begin_call, "Opens an op call: tensor arguments get guarded device copies.");
  m.def("end_call", &emu::end_call, py::arg("ok"),
        "Closes an op call: copies written arguments back (when ok) and raises for writes past an argument's end "
        "or into a read-only argument.");
  m.def("counters", []() {
    const emu::Counters c = emu::counters();
    py::dict d;
    d["launches"] = c.launches;
    d["blocks"] = c.blocks;
    d["threads"] = c.threads;
    d["barriers"] = c.barriers;
    d["warp_ops"] = c.warp_ops;
    d["cp_async_copies"] = c.cp_async_copies;
    return d;
  });
  m.def("reset_counters", &emu::reset_counters);
  m.def("device_attributes", &device_attributes, "The emulated device's attributes (an H100 SXM's).");
  m.def("run_selftest", [](const std::string& name, const py::capsule& xc, const py::capsule& outc) {
    const TensorView x = view_from_capsule(xc, "run_selftest", "x");
    const TensorView out = view_from_capsule(outc, "run_selftest", "out", true);
    check_dtype(x, "run_selftest", "x", {DType::f32});
    check_dtype(out, "run_selftest", "out", {DType::f32});
    check_shape(x, "run_selftest", "x", {64});
    check_shape(out, "run_selftest", "out", {64});
    emu::run_selftest(name, x, out);
  }, py::arg("name"), py::arg("x"), py::arg("out"), "Runs one of the planted-bug kernels of csrc/cuda_emu.");
}

}  // namespace lowbit
