// Bindings of the pack family: packing codes into the canonical layout, unpacking, and dequantization
// (uniform, table, mixed 2/4-bit), with every boundary check before a kernel runs.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/pack.h"

namespace py = pybind11;

namespace lowbit {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); }

void check_bits(const char* op, int bits) {
  if (bits < 2 || bits > 4) fail(op, "bits must be 2, 3 or 4, got " + std::to_string(bits));
}

void check_group_size(const char* op, int group_size) {
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail(op, "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
}

// A contiguous 2-D tensor [N, K >= 1], int32-indexable.
void check_matrix(const TensorView& t, const char* op, const char* arg) {
  check_ndim(t, op, arg, 2);
  if (t.size(1) < 1) fail(op, std::string(arg) + " must have at least one column (K >= 1), got shape " + t.shape_str());
  check_contiguous(t, op, arg);
  check_int32_indexable(t, op, arg);
}

// Packed words of `rows` rows and `words` words per row, on the device of `ref`.
void check_words(const TensorView& packed, const TensorView& ref, const char* op, const char* ref_name, int64_t rows,
                 int64_t words) {
  check_dtype(packed, op, "packed", {DType::i32, DType::u32});
  check_shape(packed, op, "packed", {rows, words});
  check_contiguous(packed, op, "packed");
  check_same_device(packed, ref, op, "packed", ref_name);
}

// fp16 [N, ceil(K / G)] per-group parameters.
void check_group_params(const TensorView& t, const TensorView& ref, const char* op, const char* arg, int64_t rows,
                        int64_t k, int group_size) {
  check_dtype(t, op, arg, {DType::f16});
  check_shape(t, op, arg, {rows, groups_for(k, group_size)});
  check_contiguous(t, op, arg);
  check_same_device(t, ref, op, arg, "packed");
}

void check_float_out(const TensorView& out, const char* op) {
  check_dtype(out, op, "out", {DType::f32, DType::f16, DType::bf16});
  check_matrix(out, op, "out");
}

// group_bits: uint8 [ceil(K / G)] of 2 or 4. Returns the words per row it implies. The values of a CUDA tensor
// stay on the device: then -1, and the caller checks packed's width against the range every valid map gives,
// [words_per_row(K, 2), words_per_row(K, 4)]; pack_mixed_cuda copies them to the host and checks them fully, and
// the decoding kernels never read past a row (a block whose width is not 2 or 4 decodes to NaN / code 255).
int64_t check_group_bits(const TensorView& gb, const TensorView& ref, const char* op, int64_t k, int group_size) {
  check_dtype(gb, op, "group_bits", {DType::u8});
  check_shape(gb, op, "group_bits", {groups_for(k, group_size)});
  check_contiguous(gb, op, "group_bits");
  check_same_device(gb, ref, op, "group_bits", "packed");
  if (gb.device == Device::cuda) return -1;
  const auto* b = gb.ptr<uint8_t>();
  check_group_bits_values(b, gb.numel(), op);
  return mixed_words_per_row(b, k, group_size);
}

void check_mixed_words(const TensorView& packed, const TensorView& gb, const TensorView& ref, const char* op,
                       const char* ref_name, int64_t rows, int64_t k, int group_size) {
  const int64_t words = check_group_bits(gb, packed, op, k, group_size);
  if (words >= 0) {
    check_words(packed, ref, op, ref_name, rows, words);
    return;
  }
  check_dtype(packed, op, "packed", {DType::i32, DType::u32});
  check_ndim(packed, op, "packed", 2);
  const int64_t lo = words_per_row(k, 2), hi = words_per_row(k, 4);
  if (packed.size(0) != rows || packed.size(1) < lo || packed.size(1) > hi)
    fail(op, "packed must have shape [" + std::to_string(rows) + ", W] with W the mixed words per row (between " +
                 std::to_string(lo) + " and " + std::to_string(hi) + "), got " + packed.shape_str());
  check_contiguous(packed, op, "packed");
  check_same_device(packed, ref, op, "packed", ref_name);
}

void pack_uniform(const py::capsule& codes_c, const py::capsule& packed_c, int bits, int64_t stream) {
  constexpr const char* op = "pack_uniform";
  check_bits(op, bits);
  const TensorView codes = view_from_capsule(codes_c, op, "codes");
  const TensorView packed = view_from_capsule(packed_c, op, "packed", true);
  check_dtype(codes, op, "codes", {DType::u8});
  check_matrix(codes, op, "codes");
  check_words(packed, codes, op, "codes", codes.size(0), words_per_row(codes.size(1), bits));
  if (codes.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, pack_uniform_cuda(codes, packed, bits, stream));
    return;
  }
  py::gil_scoped_release release;
  pack_uniform_cpu(codes, packed, bits);
}

void unpack(const py::capsule& packed_c, const py::capsule& codes_c, int bits, int64_t stream) {
  constexpr const char* op = "unpack";
  check_bits(op, bits);
  const TensorView packed = view_from_capsule(packed_c, op, "packed");
  const TensorView codes = view_from_capsule(codes_c, op, "codes", true);
  check_dtype(codes, op, "codes", {DType::u8});
  check_matrix(codes, op, "codes");
  check_words(packed, codes, op, "codes", codes.size(0), words_per_row(codes.size(1), bits));
  if (codes.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, unpack_cuda(packed, codes, bits, stream));
    return;
  }
  py::gil_scoped_release release;
  unpack_cpu(packed, codes, bits);
}

void dequantize_uniform(const py::capsule& packed_c, const py::capsule& scales_c, const py::capsule& zeros_c,
                        const py::capsule& out_c, int bits, int group_size, int64_t stream) {
  constexpr const char* op = "dequantize_uniform";
  check_bits(op, bits);
  check_group_size(op, group_size);
  const TensorView packed = view_from_capsule(packed_c, op, "packed");
  const TensorView scales = view_from_capsule(scales_c, op, "scales");
  const TensorView zeros = view_from_capsule(zeros_c, op, "zeros");
  const TensorView out = view_from_capsule(out_c, op, "out", true);
  check_float_out(out, op);
  const int64_t rows = out.size(0), k = out.size(1);
  check_words(packed, out, op, "out", rows, words_per_row(k, bits));
  check_group_params(scales, packed, op, "scales", rows, k, group_size);
  check_group_params(zeros, packed, op, "zeros", rows, k, group_size);
  if (out.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, dequantize_uniform_cuda(packed, scales, zeros, out, bits, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  dequantize_uniform_cpu(packed, scales, zeros, out, bits, group_size);
}

void dequantize_lut(const py::capsule& packed_c, const py::capsule& scales_c, const py::capsule& table_c,
                    const py::capsule& out_c, int bits, int group_size, int64_t stream) {
  constexpr const char* op = "dequantize_lut";
  check_bits(op, bits);
  check_group_size(op, group_size);
  const TensorView packed = view_from_capsule(packed_c, op, "packed");
  const TensorView scales = view_from_capsule(scales_c, op, "scales");
  const TensorView table = view_from_capsule(table_c, op, "table");
  const TensorView out = view_from_capsule(out_c, op, "out", true);
  check_float_out(out, op);
  const int64_t rows = out.size(0), k = out.size(1);
  check_words(packed, out, op, "out", rows, words_per_row(k, bits));
  check_group_params(scales, packed, op, "scales", rows, k, group_size);
  check_dtype(table, op, "table", {DType::f32});
  check_shape(table, op, "table", {int64_t(1) << bits});
  check_contiguous(table, op, "table");
  check_same_device(table, packed, op, "table", "packed");
  if (out.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, dequantize_lut_cuda(packed, scales, table, out, bits, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  dequantize_lut_cpu(packed, scales, table, out, bits, group_size);
}

void pack_mixed(const py::capsule& codes_c, const py::capsule& group_bits_c, const py::capsule& packed_c,
                int group_size, int64_t stream) {
  constexpr const char* op = "pack_mixed";
  check_group_size(op, group_size);
  const TensorView codes = view_from_capsule(codes_c, op, "codes");
  const TensorView group_bits = view_from_capsule(group_bits_c, op, "group_bits");
  const TensorView packed = view_from_capsule(packed_c, op, "packed", true);
  check_dtype(codes, op, "codes", {DType::u8});
  check_matrix(codes, op, "codes");
  check_mixed_words(packed, group_bits, codes, op, "codes", codes.size(0), codes.size(1), group_size);
  if (codes.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, pack_mixed_cuda(codes, group_bits, packed, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  pack_mixed_cpu(codes, group_bits, packed, group_size);
}

void unpack_mixed(const py::capsule& packed_c, const py::capsule& group_bits_c, const py::capsule& codes_c,
                  int group_size, int64_t stream) {
  constexpr const char* op = "unpack_mixed";
  check_group_size(op, group_size);
  const TensorView packed = view_from_capsule(packed_c, op, "packed");
  const TensorView group_bits = view_from_capsule(group_bits_c, op, "group_bits");
  const TensorView codes = view_from_capsule(codes_c, op, "codes", true);
  check_dtype(codes, op, "codes", {DType::u8});
  check_matrix(codes, op, "codes");
  check_mixed_words(packed, group_bits, codes, op, "codes", codes.size(0), codes.size(1), group_size);
  if (codes.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, unpack_mixed_cuda(packed, group_bits, codes, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  unpack_mixed_cpu(packed, group_bits, codes, group_size);
}

void dequantize_mixed(const py::capsule& packed_c, const py::capsule& scales_c, const py::capsule& zeros_c,
                      const py::capsule& group_bits_c, const py::capsule& out_c, int group_size, int64_t stream) {
  constexpr const char* op = "dequantize_mixed";
  check_group_size(op, group_size);
  const TensorView packed = view_from_capsule(packed_c, op, "packed");
  const TensorView scales = view_from_capsule(scales_c, op, "scales");
  const TensorView zeros = view_from_capsule(zeros_c, op, "zeros");
  const TensorView group_bits = view_from_capsule(group_bits_c, op, "group_bits");
  const TensorView out = view_from_capsule(out_c, op, "out", true);
  check_float_out(out, op);
  const int64_t rows = out.size(0), k = out.size(1);
  check_mixed_words(packed, group_bits, out, op, "out", rows, k, group_size);
  check_group_params(scales, packed, op, "scales", rows, k, group_size);
  check_group_params(zeros, packed, op, "zeros", rows, k, group_size);
  if (out.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, dequantize_mixed_cuda(packed, scales, zeros, group_bits, out, group_size, stream));
    return;
  }
  py::gil_scoped_release release;
  dequantize_mixed_cpu(packed, scales, zeros, group_bits, out, group_size);
}

}  // namespace

void register_pack(py::module_& m) {
  m.def("pack_uniform", &pack_uniform, py::arg("codes"), py::arg("packed"), py::arg("bits"), py::arg("stream"),
        "Packs uint8 codes [N, K] of `bits` bits into packed [N, ceil(K/32)*bits] (ValueError on a code >= 2^bits).");
  m.def("unpack", &unpack, py::arg("packed"), py::arg("codes"), py::arg("bits"), py::arg("stream"),
        "Unpacks packed [N, ceil(K/32)*bits] words into uint8 codes [N, K].");
  m.def("dequantize_uniform", &dequantize_uniform, py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("out"), py::arg("bits"), py::arg("group_size"), py::arg("stream"),
        "out[n, k] = scales[n, g] * (q[n, k] - zeros[n, g]), g = k / group_size.");
  m.def("dequantize_lut", &dequantize_lut, py::arg("packed"), py::arg("scales"), py::arg("table"), py::arg("out"),
        py::arg("bits"), py::arg("group_size"), py::arg("stream"),
        "out[n, k] = scales[n, g] * table[q[n, k]], g = k / group_size.");
  m.def("pack_mixed", &pack_mixed, py::arg("codes"), py::arg("group_bits"), py::arg("packed"), py::arg("group_size"),
        py::arg("stream"), "Packs codes with a per-group width (2 or 4) into the mixed layout.");
  m.def("unpack_mixed", &unpack_mixed, py::arg("packed"), py::arg("group_bits"), py::arg("codes"),
        py::arg("group_size"), py::arg("stream"), "Unpacks the mixed layout into uint8 codes [N, K].");
  m.def("dequantize_mixed", &dequantize_mixed, py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_bits"), py::arg("out"), py::arg("group_size"), py::arg("stream"),
        "Affine dequantization of the mixed layout.");
  m.def("words_per_row", [](int64_t k, int bits) { return words_per_row(k, bits); }, py::arg("k"), py::arg("bits"),
        "ceil(k / 32) * bits: packed words per row.");
}

}  // namespace lowbit
