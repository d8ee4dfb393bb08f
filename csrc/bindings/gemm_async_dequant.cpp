// Bindings of the asynchronous-dequantization 2/4-bit GEMM family: int8 activation quantization, the GEMM over
// the aligned weight layout and the mixed 2/4-bit GEMM over the mixed aligned layout (each also from float
// activations on the CPU, quantized inside the call), with every boundary check before a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/async_dequant.h"
#include "lowbit/pack.h"

namespace py = pybind11;

namespace lowbit {
namespace {

void check_group_size(const char* op, int group_size) {
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument(std::string(op) + ": group_size must be 32, 64 or 128, got " +
                                std::to_string(group_size));
}

void check_operand(const TensorView& t, const TensorView& ref, const char* op, const char* arg, const char* ref_name,
                   std::initializer_list<DType> dtypes, const std::vector<int64_t>& shape) {
  check_dtype(t, op, arg, dtypes);
  check_ndim(t, op, arg, int(shape.size()));
  check_shape(t, op, arg, shape);
  check_contiguous(t, op, arg);
  check_same_device(t, ref, op, arg, ref_name);
  check_int32_indexable(t, op, arg);
}

void quantize_activations(const py::capsule& xc, const py::capsule& xqc, const py::capsule& dc, int group_size,
                          int64_t stream) {
  const char* op = "quantize_activations";
  check_group_size(op, group_size);
  const TensorView x = view_from_capsule(xc, op, "x");
  const TensorView xq = view_from_capsule(xqc, op, "xq", true);
  const TensorView d = view_from_capsule(dc, op, "d", true);
  check_dtype(x, op, "x", {DType::f32, DType::f16, DType::bf16});
  check_ndim(x, op, "x", 2);
  check_contiguous(x, op, "x");
  check_int32_indexable(x, op, "x");
  const int64_t m = x.size(0), k = x.size(1);
  if (k < 1) throw std::invalid_argument(std::string(op) + ": x must have K >= 1 columns, got shape " + x.shape_str());
  check_operand(xq, x, op, "xq", "x", {DType::i8}, {m, aligned_padded_k(k)});
  check_operand(d, x, op, "d", "x", {DType::f32}, {m, groups_for(k, group_size)});
  if (x.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, quantize_activations_cuda(x, xq, d, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  quantize_activations_cpu(x, xq, d, group_size);
}

// x [M, K] on the CPU quantized to int8 per row and group inside a native call (what quantize_activations
// would return), so the CPU GEMMs of float activations cost one call from Python.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d;
  TensorView xq, dv;
  int64_t k = 0;
};

QuantizedRows quantize_float_rows(const py::capsule& xc, const char* op, int group_size) {
  const TensorView x = view_from_capsule(xc, op, "x");
  check_dtype(x, op, "x", {DType::f32, DType::f16, DType::bf16});
  check_ndim(x, op, "x", 2);
  check_contiguous(x, op, "x");
  check_int32_indexable(x, op, "x");
  if (x.device != Device::cpu)
    throw std::invalid_argument(std::string(op) + ": x must be a CPU tensor (CUDA: quantize_activations first)");
  const int64_t m = x.size(0), k = x.size(1), kp = aligned_padded_k(k), groups = groups_for(k, group_size);
  if (k < 1) throw std::invalid_argument(std::string(op) + ": x must have K >= 1 columns, got shape " + x.shape_str());
  QuantizedRows r;
  r.k = k;
  r.q.resize(size_t(m * kp));
  r.d.resize(size_t(m * groups));
  r.xq = TensorView{r.q.data(), DType::i8, Device::cpu, 0, {m, kp}, {kp, 1}};
  r.dv = TensorView{r.d.data(), DType::f32, Device::cpu, 0, {m, groups}, {groups, 1}};
  py::gil_scoped_release release;
  quantize_activations_cpu(x, r.xq, r.dv, group_size);
  return r;
}

void async_gemm_views(const TensorView& xq, const TensorView& d, const py::capsule& packedc,
                      const py::capsule& scalesc, const std::optional<py::capsule>& zerosc,
                      const std::optional<py::capsule>& table_qc, const std::optional<py::capsule>& table_scalec,
                      const py::capsule& outc, int64_t k, int bits, int group_size, int64_t stream) {
  const char* op = "async_dequant_gemm";
  check_group_size(op, group_size);
  if (!async_bits_ok(bits))
    throw std::invalid_argument(std::string(op) + ": bits must be 2 or 4, got " + std::to_string(bits));
  if (k < 1) throw std::invalid_argument(std::string(op) + ": k must be >= 1, got " + std::to_string(k));
  if (table_qc.has_value() != table_scalec.has_value())
    throw std::invalid_argument(std::string(op) + ": table_q and table_scale must be given together");
  const TensorView packed = view_from_capsule(packedc, op, "packed");
  const TensorView scales = view_from_capsule(scalesc, op, "scales");
  const TensorView out = view_from_capsule(outc, op, "out", true);
  check_dtype(xq, op, "xq", {DType::i8});
  check_ndim(xq, op, "xq", 2);
  const int64_t m = xq.size(0), groups = groups_for(k, group_size);
  check_operand(xq, xq, op, "xq", "xq", {DType::i8}, {m, aligned_padded_k(k)});
  check_operand(d, xq, op, "d", "xq", {DType::f32}, {m, groups});
  check_dtype(packed, op, "packed", {DType::i32, DType::u32});
  check_ndim(packed, op, "packed", 2);
  const int64_t n = packed.size(0);
  check_operand(packed, xq, op, "packed", "xq", {DType::i32, DType::u32}, {n, aligned_words_per_row(k, bits)});
  check_operand(scales, xq, op, "scales", "xq", {DType::f16}, {n, groups});
  std::optional<TensorView> zeros, table_q, table_scale;
  if (zerosc) {
    zeros = view_from_capsule(*zerosc, op, "zeros");
    check_operand(*zeros, xq, op, "zeros", "xq", {DType::f16}, {n, groups});
  }
  if (table_qc) {
    table_q = view_from_capsule(*table_qc, op, "table_q");
    table_scale = view_from_capsule(*table_scalec, op, "table_scale");
    check_operand(*table_q, xq, op, "table_q", "xq", {DType::i8}, {kTableBytes});
    check_aligned(*table_q, op, "table_q", 4);  // read as 4 words
    check_operand(*table_scale, xq, op, "table_scale", "xq", {DType::f32}, {1});
  }
  check_operand(out, xq, op, "out", "xq", {DType::f32, DType::f16, DType::bf16}, {m, n});
  const AsyncGemmOperands operands{xq, d, packed, scales, zeros ? &*zeros : nullptr,
                                   table_q ? &*table_q : nullptr, table_scale ? &*table_scale : nullptr,
                                   out, k, bits, group_size};
  if (xq.device == Device::cuda) {
    check_aligned(xq, op, "xq", 16);  // 16-byte cp.async copies
    check_aligned(packed, op, "packed", 16);
    LOWBIT_RUN_CUDA(op, async_dequant_gemm_cuda(operands, stream));
    return;
  }
  py::gil_scoped_release release;
  async_dequant_gemm_cpu(operands);
}

void async_dequant_gemm(const py::capsule& xqc, const py::capsule& dc, const py::capsule& packedc,
                        const py::capsule& scalesc, const std::optional<py::capsule>& zerosc,
                        const std::optional<py::capsule>& table_qc, const std::optional<py::capsule>& table_scalec,
                        const py::capsule& outc, int64_t k, int bits, int group_size, int64_t stream) {
  const char* op = "async_dequant_gemm";
  async_gemm_views(view_from_capsule(xqc, op, "xq"), view_from_capsule(dc, op, "d"), packedc, scalesc, zerosc,
                   table_qc, table_scalec, outc, k, bits, group_size, stream);
}

void async_dequant_gemm_float(const py::capsule& xc, const py::capsule& packedc, const py::capsule& scalesc,
                              const std::optional<py::capsule>& zerosc, const std::optional<py::capsule>& table_qc,
                              const std::optional<py::capsule>& table_scalec, const py::capsule& outc, int bits,
                              int group_size) {
  const char* op = "async_dequant_gemm";
  check_group_size(op, group_size);
  const QuantizedRows x = quantize_float_rows(xc, op, group_size);
  async_gemm_views(x.xq, x.dv, packedc, scalesc, zerosc, table_qc, table_scalec, outc, x.k, bits, group_size, 0);
}

void mixed_gemm_views(const TensorView& xq, const TensorView& d, const py::capsule& packedc,
                      const py::capsule& runs4c, const py::capsule& runs2c, const py::capsule& scalesc,
                      const py::capsule& zerosc, const py::capsule& outc, int64_t k, int group_size, int64_t stream) {
  const char* op = "mixed_gemm";
  check_group_size(op, group_size);
  if (k < 1) throw std::invalid_argument(std::string(op) + ": k must be >= 1, got " + std::to_string(k));
  const TensorView packed = view_from_capsule(packedc, op, "packed");
  const TensorView runs4 = view_from_capsule(runs4c, op, "runs4");
  const TensorView runs2 = view_from_capsule(runs2c, op, "runs2");
  const TensorView scales = view_from_capsule(scalesc, op, "scales");
  const TensorView zeros = view_from_capsule(zerosc, op, "zeros");
  const TensorView out = view_from_capsule(outc, op, "out", true);
  check_dtype(xq, op, "xq", {DType::i8});
  check_ndim(xq, op, "xq", 2);
  const int64_t m = xq.size(0), groups = groups_for(k, group_size), kruns = (k + 31) / 32;
  check_operand(xq, xq, op, "xq", "xq", {DType::i8}, {m, aligned_padded_k(k)});
  check_operand(d, xq, op, "d", "xq", {DType::f32}, {m, groups});
  check_dtype(runs4, op, "runs4", {DType::i32});
  check_ndim(runs4, op, "runs4", 1);
  check_dtype(runs2, op, "runs2", {DType::i32});
  check_ndim(runs2, op, "runs2", 1);
  const int64_t r4 = runs4.size(0), r2 = runs2.size(0);
  if (r4 + r2 != kruns)
    throw std::invalid_argument(std::string(op) + ": runs4 and runs2 must hold the ceil(K / 32) = " +
                                std::to_string(kruns) + " runs of K between them, got " + std::to_string(r4) + " + " +
                                std::to_string(r2));
  check_operand(runs4, xq, op, "runs4", "xq", {DType::i32}, {r4});
  check_operand(runs2, xq, op, "runs2", "xq", {DType::i32}, {r2});
  if (xq.device == Device::cpu) {  // CUDA tensors: lowbit.ops.mixed_gemm checks them (QuantLinear once)
    // Each run of K once, each segment in increasing order, all runs of a K-group in one segment.
    std::vector<int> segment_of_group(size_t(groups), -1);
    int64_t total = 0;
    for (int sg = 0; sg < 2; ++sg) {
      const TensorView& runs = sg == 0 ? runs4 : runs2;
      const char* name = sg == 0 ? "runs4" : "runs2";
      for (int64_t r = 0; r < runs.size(0); ++r, ++total) {
        const int32_t v = runs.ptr<int32_t>()[r];
        const int32_t prev = r ? runs.ptr<int32_t>()[r - 1] : -1;
        if (v <= prev || v >= kruns)
          throw std::invalid_argument(std::string(op) + ": " + name + " must be increasing runs of K (0.." +
                                      std::to_string(kruns - 1) + "), got " + name + "[" + std::to_string(r) +
                                      "] = " + std::to_string(v));
        int& owner = segment_of_group[size_t(int64_t(v) * 32 / group_size)];
        if (owner >= 0 && owner != sg)
          throw std::invalid_argument(std::string(op) + ": the runs of K-group " +
                                      std::to_string(int64_t(v) * 32 / group_size) +
                                      " must all be in runs4 or all in runs2");
        owner = sg;
      }
    }
  }
  check_dtype(packed, op, "packed", {DType::i32, DType::u32});
  check_ndim(packed, op, "packed", 2);
  const int64_t n = packed.size(0);
  check_operand(packed, xq, op, "packed", "xq", {DType::i32, DType::u32}, {n, mixed_aligned_words(r4, r2)});
  check_operand(scales, xq, op, "scales", "xq", {DType::f16}, {n, groups});
  check_operand(zeros, xq, op, "zeros", "xq", {DType::f16}, {n, groups});
  check_operand(out, xq, op, "out", "xq", {DType::f32, DType::f16, DType::bf16}, {m, n});
  const MixedGemmOperands operands{xq, d, packed, runs4, runs2, scales, zeros, out, k, group_size};
  if (xq.device == Device::cuda) {
    check_aligned(xq, op, "xq", 16);
    check_aligned(packed, op, "packed", 16);
    LOWBIT_RUN_CUDA(op, mixed_gemm_cuda(operands, stream));
    return;
  }
  py::gil_scoped_release release;
  mixed_gemm_cpu(operands);
}

void mixed_gemm(const py::capsule& xqc, const py::capsule& dc, const py::capsule& packedc, const py::capsule& runs4c,
                const py::capsule& runs2c, const py::capsule& scalesc, const py::capsule& zerosc,
                const py::capsule& outc, int64_t k, int group_size, int64_t stream) {
  const char* op = "mixed_gemm";
  mixed_gemm_views(view_from_capsule(xqc, op, "xq"), view_from_capsule(dc, op, "d"), packedc, runs4c, runs2c,
                   scalesc, zerosc, outc, k, group_size, stream);
}

void mixed_gemm_float(const py::capsule& xc, const py::capsule& packedc, const py::capsule& runs4c,
                      const py::capsule& runs2c, const py::capsule& scalesc, const py::capsule& zerosc,
                      const py::capsule& outc, int group_size) {
  const char* op = "mixed_gemm";
  check_group_size(op, group_size);
  const QuantizedRows x = quantize_float_rows(xc, op, group_size);
  mixed_gemm_views(x.xq, x.dv, packedc, runs4c, runs2c, scalesc, zerosc, outc, x.k, group_size, 0);
}

}  // namespace

void register_async_dequant(py::module_& m) {
  m.def("quantize_activations", &quantize_activations, py::arg("x"), py::arg("xq"), py::arg("d"),
        py::arg("group_size"), py::arg("stream"),
        "Symmetric int8 quantization of x [M, K] per row and group: xq [M, ceil(K/128)*128], d [M, groups].");
  m.def("async_dequant_gemm", &async_dequant_gemm, py::arg("xq"), py::arg("d"), py::arg("packed"),
        py::arg("scales"), py::arg("zeros").none(true), py::arg("table_q").none(true),
        py::arg("table_scale").none(true), py::arg("out"), py::arg("k"), py::arg("bits"), py::arg("group_size"),
        py::arg("stream"),
        "out = dequant(xq, d) . W_hat^T for a 2- or 4-bit weight in the aligned layout (async_dequant.h), W_hat = "
        "scales * (q - zeros), or scales * (table_scale * table_q[q] - zeros) with a table.");
  m.def("async_dequant_gemm_float", &async_dequant_gemm_float, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("zeros").none(true), py::arg("table_q").none(true), py::arg("table_scale").none(true),
        py::arg("out"), py::arg("bits"), py::arg("group_size"),
        "async_dequant_gemm of float activations x [M, K] on the CPU, quantized inside the call as "
        "quantize_activations does.");
  m.def("mixed_gemm_float", &mixed_gemm_float, py::arg("x"), py::arg("packed"), py::arg("runs4"), py::arg("runs2"),
        py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("group_size"),
        "mixed_gemm of float activations x [M, K] on the CPU, quantized inside the call.");
  m.def("mixed_gemm", &mixed_gemm, py::arg("xq"), py::arg("d"), py::arg("packed"), py::arg("runs4"),
        py::arg("runs2"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("k"), py::arg("group_size"),
        py::arg("stream"),
        "out = dequant(xq, d) . W_hat^T for a mixed 2/4-bit weight in the mixed aligned layout (async_dequant.h).");
}

}  // namespace lowbit
