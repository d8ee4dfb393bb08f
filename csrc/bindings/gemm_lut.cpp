// Bindings of the LUT GEMM family: y = x . W_hat^T over a packed weight, and the CPU path selection.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/lut_gemm.h"

namespace py = pybind11;

namespace lowbit {
namespace {

constexpr const char* kOp = "lut_gemm";

void check_input(const TensorView& t, const TensorView& x, const char* arg, const std::vector<int64_t>& shape) {
  check_ndim(t, kOp, arg, int(shape.size()));
  check_shape(t, kOp, arg, shape);
  check_contiguous(t, kOp, arg);
  check_same_device(x, t, kOp, "x", arg);
  check_int32_indexable(t, kOp, arg);
}

void lut_gemm(const py::capsule& xc, const py::capsule& packedc, const py::capsule& scalesc,
              const std::optional<py::capsule>& zerosc, const py::capsule& tablec, const py::capsule& outc, int bits,
              int group_size, int64_t stream) {
  if (!lut_gemm_bits_ok(bits))
    throw std::invalid_argument(std::string(kOp) + ": bits must be 2, 3 or 4, got " + std::to_string(bits));
  if (!lut_gemm_group_ok(group_size))
    throw std::invalid_argument(std::string(kOp) + ": group_size must be 32, 64 or 128, got " +
                                std::to_string(group_size));
  const TensorView x = view_from_capsule(xc, kOp, "x");
  const TensorView packed = view_from_capsule(packedc, kOp, "packed");
  const TensorView scales = view_from_capsule(scalesc, kOp, "scales");
  const TensorView table = view_from_capsule(tablec, kOp, "table");
  const TensorView out = view_from_capsule(outc, kOp, "out", true);
  check_dtype(x, kOp, "x", {DType::f32, DType::f16, DType::bf16});
  check_ndim(x, kOp, "x", 2);
  check_contiguous(x, kOp, "x");
  check_int32_indexable(x, kOp, "x");
  check_dtype(packed, kOp, "packed", {DType::i32, DType::u32});
  check_ndim(scales, kOp, "scales", 2);
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(0);
  if (packed.ndim() == 3) {  // the interleaved layout
    if (x.device == Device::cuda)
      throw std::invalid_argument(std::string(kOp) + ": the interleaved code layout runs on the CPU only; pass the "
                                  "canonical [N, words] codes for CUDA tensors");
    check_input(packed, x, "packed",
                {(n + kLutInterleaveRows - 1) / kLutInterleaveRows, words_per_row(k, bits), kLutInterleaveRows});
  } else {
    check_input(packed, x, "packed", {n, words_per_row(k, bits)});
  }
  const std::vector<int64_t> group_shape{n, groups_for(k, group_size)};
  check_dtype(scales, kOp, "scales", {DType::f16});
  check_input(scales, x, "scales", group_shape);
  std::optional<TensorView> zeros;
  if (zerosc) {
    zeros = view_from_capsule(*zerosc, kOp, "zeros");
    check_dtype(*zeros, kOp, "zeros", {DType::f16});
    check_input(*zeros, x, "zeros", group_shape);
  }
  check_dtype(table, kOp, "table", {DType::f32});
  check_input(table, x, "table", {int64_t(1) << bits});
  if (out.dtype != x.dtype)
    throw type_error(std::string(kOp) + ": out must have the dtype of x (" + dtype_name(x.dtype) + "), got " +
                     dtype_name(out.dtype));
  check_input(out, x, "out", {m, n});
  const TensorView* zp = zeros ? &*zeros : nullptr;
  if (x.device == Device::cuda) {
    LOWBIT_RUN_CUDA(kOp, lut_gemm_cuda(x, packed, scales, zp, table, out, bits, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  lut_gemm_cpu(x, packed, scales, zp, table, out, bits, group_size);
}

}  // namespace

void register_lut_gemm(py::module_& m) {
  m.def("lut_gemm", &lut_gemm, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("table"), py::arg("out"), py::arg("bits"), py::arg("group_size"), py::arg("stream"),
        "out = x . W_hat^T, W_hat[n, k] = scales[n, k / group_size] * (table[q[n, k]] - zeros[n, k / group_size]).");
}

}  // namespace lowbit
