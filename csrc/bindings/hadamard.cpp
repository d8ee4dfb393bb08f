// Bindings of the Hadamard family: the transform, its supported sizes, and the H_m tables (for tests).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/hadamard.h"

namespace py = pybind11;

namespace lowbit {
namespace {

constexpr const char* kOp = "hadamard_transform";

// Nearest supported sizes below and above n (0 when there is none on that side).
std::pair<int, int> nearest_sizes(int64_t n) {
  int below = 0, above = 0, k = 0, m = 0;
  for (int c = int(std::min<int64_t>(n, kHadamardMaxN)); c >= 1; --c)
    if (hadamard_factor(c, &k, &m)) {
      below = c;
      break;
    }
  for (int64_t c = std::max<int64_t>(n, 1); c <= kHadamardMaxN; ++c)
    if (hadamard_factor(c, &k, &m)) {
      above = int(c);
      break;
    }
  return {below, above};
}

void check_size(int64_t n) {
  int k = 0, m = 0;
  if (hadamard_factor(n, &k, &m)) return;
  auto [below, above] = nearest_sizes(n);
  std::string msg = std::string(kOp) + ": the last dimension of x must be 2^k * m with m in {1";
  for (const HadamardTable& t : kHadamardTables) msg += ", " + std::to_string(t.m);
  msg += "} and at most " + std::to_string(kHadamardMaxN) + ", got " + std::to_string(n) + "; nearest supported sizes: ";
  if (below) msg += std::to_string(below);
  if (below && above) msg += " and ";
  if (above) msg += std::to_string(above);
  throw std::invalid_argument(msg);
}

void transform(const py::capsule& xc, const py::capsule& outc, const std::optional<py::capsule>& signsc, float scale,
               bool inverse, int64_t stream) {
  const TensorView x = view_from_capsule(xc, kOp, "x");
  const TensorView out = view_from_capsule(outc, kOp, "out", true);
  check_dtype(x, kOp, "x", {DType::f32, DType::f16, DType::bf16});
  if (x.ndim() < 1) throw std::invalid_argument(std::string(kOp) + ": x must have at least one dimension, got a scalar");
  check_size(x.size(-1));
  check_contiguous(x, kOp, "x");
  check_contiguous(out, kOp, "out");
  check_shape(out, kOp, "out", x.shape);
  if (out.dtype != x.dtype) throw type_error(std::string(kOp) + ": out must have the dtype of x");
  check_same_device(x, out, kOp, "x", "out");
  check_int32_indexable(x, kOp, "x");
  std::optional<TensorView> signs;
  if (signsc) {
    signs = view_from_capsule(*signsc, kOp, "signs");
    check_dtype(*signs, kOp, "signs", {DType::f32});
    check_shape(*signs, kOp, "signs", {x.size(-1)});
    check_contiguous(*signs, kOp, "signs");
    check_same_device(x, *signs, kOp, "x", "signs");
  }
  const TensorView* sp = signs ? &*signs : nullptr;
  if (x.device == Device::cuda) {
    LOWBIT_RUN_CUDA(kOp, hadamard_transform_cuda(x, out, sp, scale, inverse, stream));
    return;
  }
  py::gil_scoped_release release;
  hadamard_transform_cpu(x, out, sp, scale, inverse);
}

}  // namespace

void register_hadamard(py::module_& m) {
  m.def("hadamard_transform", &transform, py::arg("x"), py::arg("out"), py::arg("signs"), py::arg("scale"),
        py::arg("inverse"), py::arg("stream"),
        "out = scale * H (signs * x) (inverse: signs * (scale * H^T x)) over the last dim of contiguous x.");
  m.def("hadamard_factor", [](int64_t n) -> py::object {
    int k = 0, mm = 0;
    if (!hadamard_factor(n, &k, &mm)) return py::none();
    return py::make_tuple(1 << k, mm);
  }, py::arg("n"), "(2^k, m) with n = 2^k * m for a supported n, else None.");
  m.def("hadamard_check_size", &check_size, py::arg("n"), "Raises ValueError naming the nearest sizes if n is unsupported.");
  m.def("hadamard_factors", []() {
    std::vector<int> ms{1};
    for (const HadamardTable& t : kHadamardTables) ms.push_back(t.m);
    return ms;
  });
  m.def("hadamard_table", [](int mm) {
    const HadamardTable* t = hadamard_table(mm);
    if (!t) throw std::invalid_argument("hadamard_table: no table for m = " + std::to_string(mm));
    std::vector<std::vector<int>> rows(mm, std::vector<int>(mm));
    for (int i = 0; i < mm; ++i)
      for (int j = 0; j < mm; ++j) rows[i][j] = int(hadamard_sign(kHadamardRowBits + t->offset, t->words_per_row, i, j));
    return rows;
  }, py::arg("m"), "H_m as a list of rows of +1/-1.");
}

}  // namespace lowbit
