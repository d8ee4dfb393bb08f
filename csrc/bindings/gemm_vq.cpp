// Bindings of the VQ family: the VQ GEMM (CPU strategy selectable) and VQ dequantization, with every boundary
// check (dtypes, shapes, K % 8, R, E, contiguity, devices, sizes) before a kernel runs.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/vq.h"

namespace py = pybind11;

namespace lowbit {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); }

const char* strategy_name(VqStrategy s) {
  switch (s) {
    case VqStrategy::kAuto: return "auto";
    case VqStrategy::kDecode: return "decode";
    case VqStrategy::kLut: return "lut";
  }
  return "?";
}

VqStrategy parse_strategy(const std::string& s) {
  if (s == "auto") return VqStrategy::kAuto;
  if (s == "decode") return VqStrategy::kDecode;
  if (s == "lut") return VqStrategy::kLut;
  fail("vq_gemm", "strategy must be 'auto', 'decode' or 'lut', got '" + s + "'");
}

// codes [N, J, R] (int16/uint16, or uint8 for byte indices; R in {1, 2}), codebooks fp16 [R, E, 8] (E a power
// of two in [256, 65536]), scales fp16 [N]: all contiguous, on one device.
void check_format(const TensorView& codes, const TensorView& codebooks, const TensorView& scales, const char* op) {
  check_dtype(codes, op, "codes", {DType::i16, DType::u16, DType::u8});
  check_ndim(codes, op, "codes", 3);
  const int64_t r = codes.size(2);
  if (r < 1 || r > kVqMaxCodebooks)
    fail(op, "codes must have shape [N, K / 8, R] with R (residual codebooks) 1 or 2, got R = " + std::to_string(r) +
                 " (shape " + codes.shape_str() + ")");
  check_contiguous(codes, op, "codes");
  check_int32_indexable(codes, op, "codes");
  check_dtype(codebooks, op, "codebooks", {DType::f16});
  check_ndim(codebooks, op, "codebooks", 3);
  if (codebooks.size(0) != r || codebooks.size(2) != kVqVecLen)
    fail(op, "codebooks must have shape [R, E, 8] = [" + std::to_string(r) + ", E, 8] (R from codes), got " +
                 codebooks.shape_str());
  if (!vq_entries_ok(codebooks.size(1)))
    fail(op, "codebooks must have E = 2^c entries with 8 <= c <= 16 (a power of two in [256, 65536]), got E = " +
                 std::to_string(codebooks.size(1)));
  check_contiguous(codebooks, op, "codebooks");
  check_dtype(scales, op, "scales", {DType::f16});
  check_shape(scales, op, "scales", {codes.size(0)});
  check_contiguous(scales, op, "scales");
  check_same_device(codes, codebooks, op, "codes", "codebooks");
  check_same_device(codes, scales, op, "codes", "scales");
  if (codes.device == Device::cuda) check_aligned(codebooks, op, "codebooks", 16);
}

void gemm(const py::capsule& xc, const py::capsule& codesc, const py::capsule& codebooksc, const py::capsule& scalesc,
          const py::capsule& outc, const std::string& strategy, int64_t stream) {
  constexpr const char* op = "vq_gemm";
  const VqStrategy s = parse_strategy(strategy);
  const TensorView x = view_from_capsule(xc, op, "x");
  const TensorView codes = view_from_capsule(codesc, op, "codes");
  const TensorView codebooks = view_from_capsule(codebooksc, op, "codebooks");
  const TensorView scales = view_from_capsule(scalesc, op, "scales");
  const TensorView out = view_from_capsule(outc, op, "out", true);
  check_dtype(x, op, "x", {DType::f32, DType::f16, DType::bf16});
  check_ndim(x, op, "x", 2);
  const int64_t k = x.size(1);
  if (k % kVqVecLen != 0 || k == 0)
    fail(op, "x must have K (its last dimension) a positive multiple of 8 (the vector length), got K = " +
                 std::to_string(k));
  check_contiguous(x, op, "x");
  check_int32_indexable(x, op, "x");
  check_format(codes, codebooks, scales, op);
  if (codes.size(1) * kVqVecLen != k)
    fail(op, "codes must have shape [N, K / 8, R] = [N, " + std::to_string(k / kVqVecLen) + ", R] for x with K = " +
                 std::to_string(k) + ", got " + codes.shape_str());
  check_same_device(x, codes, op, "x", "codes");
  check_shape(out, op, "out", {x.size(0), codes.size(0)});
  if (out.dtype != x.dtype) throw type_error(std::string(op) + ": out must have the dtype of x");
  check_contiguous(out, op, "out");
  check_int32_indexable(out, op, "out");
  check_same_device(x, out, op, "x", "out");
  if (x.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, vq_gemm_cuda(x, codes, codebooks, scales, out, stream));
    return;
  }
  py::gil_scoped_release release;
  vq_gemm_cpu(x, codes, codebooks, scales, out, s);
}

void dequantize(const py::capsule& codesc, const py::capsule& codebooksc, const py::capsule& scalesc,
                const py::capsule& outc, int64_t stream) {
  constexpr const char* op = "vq_dequantize";
  const TensorView codes = view_from_capsule(codesc, op, "codes");
  const TensorView codebooks = view_from_capsule(codebooksc, op, "codebooks");
  const TensorView scales = view_from_capsule(scalesc, op, "scales");
  const TensorView out = view_from_capsule(outc, op, "out", true);
  check_format(codes, codebooks, scales, op);
  check_dtype(out, op, "out", {DType::f32, DType::f16, DType::bf16});
  check_shape(out, op, "out", {codes.size(0), codes.size(1) * kVqVecLen});
  check_contiguous(out, op, "out");
  check_int32_indexable(out, op, "out");
  check_same_device(codes, out, op, "codes", "out");
  if (codes.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, vq_dequantize_cuda(codes, codebooks, scales, out, stream));
    return;
  }
  py::gil_scoped_release release;
  vq_dequantize_cpu(codes, codebooks, scales, out);
}

}  // namespace

void register_vq_gemm(py::module_& m) {
  m.def("vq_gemm", &gemm, py::arg("x"), py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("out"),
        py::arg("strategy") = "auto", py::arg("stream") = 0,
        "out = x . W_hat^T for VQ weights (vq.h); strategy 'auto' | 'decode' | 'lut' picks the CPU kernel "
        "(CUDA ignores it).");
  m.def("vq_dequantize", &dequantize, py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("out"),
        py::arg("stream") = 0, "out [N, K] = W_hat for VQ weights (vq.h).");
  m.def("vq_gemm_cpu_choice", [](int64_t m, int64_t n, int64_t k, int r, int64_t e) {
    return std::string(strategy_name(vq_gemm_cpu_choice(m, n, k, r, e)));
  }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("r"), py::arg("e"),
     "The CPU strategy ('decode' or 'lut') that 'auto' picks for these sizes on this CPU.");
}

}  // namespace lowbit
