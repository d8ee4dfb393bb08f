// Bindings of the quantized KV cache family: key/value quantization and dequantization, decode attention over the
// packed cache, and the split count of the CUDA decode, with every boundary check before a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/device.h"
#include "bindings/dlpack_view.h"
#include "bindings/registry.h"
#include "lowbit/kv.h"

namespace py = pybind11;

namespace lowbit {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

void check_bits(const char* op, int bits) {
  if (!kv_bits_ok(bits)) fail(op, "bits must be 2 or 4, got " + std::to_string(bits));
}

void check_group(const char* op, int group) {
  if (!kv_group_ok(group)) fail(op, "group_size must be 32, 64 or 128, got " + std::to_string(group));
}

void check_head_dim(const char* op, const char* arg, int64_t d) {
  if (!kv_head_dim_ok(d))
    fail(op, std::string("the head dimension (last dim of ") + arg + ") must be 64, 80, 96, 128 or 256, got " +
                 std::to_string(d));
}

// dtype, exact shape, contiguity, device of `ref`, int32-indexable.
void check_tensor(const TensorView& t, const TensorView& ref, const char* op, const char* arg, const char* ref_name,
                  std::initializer_list<DType> dtypes, const std::vector<int64_t>& shape) {
  check_dtype(t, op, arg, dtypes);
  check_shape(t, op, arg, shape);
  check_contiguous(t, op, arg);
  check_same_device(t, ref, op, arg, ref_name);
  check_int32_indexable(t, op, arg);
}

// A contiguous float [B, H, T, D] with a supported D.
void check_bhtd(const TensorView& t, const char* op, const char* arg) {
  check_dtype(t, op, arg, {DType::f32, DType::f16, DType::bf16});
  check_ndim(t, op, arg, 4);
  check_head_dim(op, arg, t.size(3));
  check_contiguous(t, op, arg);
  check_int32_indexable(t, op, arg);
}

const std::initializer_list<DType> kWords = {DType::i32, DType::u32};

// The packed keys (codes, scale, zero) of the float keys `ref` [B, H, T, D] (named ref_name): T a multiple of
// the group, codes [B, H, T/G, D, G*b/32], scale and zero fp16 [B, H, T/G, D].
void check_key_store(const TensorView& ref, const char* ref_name, const TensorView& codes, const TensorView& scale,
                     const TensorView& zero, const char* op, int bits, int group) {
  check_bhtd(ref, op, ref_name);
  const int64_t B = ref.size(0), H = ref.size(1), T = ref.size(2), D = ref.size(3);
  if (T % group != 0)
    fail(op, std::string("the token count of ") + ref_name + " (dim 2) must be a multiple of group_size " +
                 std::to_string(group) + ", got " + std::to_string(T));
  check_tensor(codes, ref, op, "codes", ref_name, kWords, {B, H, T / group, D, kv_key_words(group, bits)});
  check_tensor(scale, ref, op, "scale", ref_name, {DType::f16}, {B, H, T / group, D});
  check_tensor(zero, ref, op, "zero", ref_name, {DType::f16}, {B, H, T / group, D});
}

// The packed values (codes, scale, zero) of the float values `ref` [B, H, T, D]: codes [B, H, T, ceil(D/32)*b],
// scale and zero fp16 [B, H, T, ceil(D/32)].
void check_value_store(const TensorView& ref, const char* ref_name, const TensorView& codes, const TensorView& scale,
                       const TensorView& zero, const char* op, int bits) {
  check_bhtd(ref, op, ref_name);
  const int64_t B = ref.size(0), H = ref.size(1), T = ref.size(2), D = ref.size(3);
  check_tensor(codes, ref, op, "codes", ref_name, kWords, {B, H, T, kv_value_words(D, bits)});
  check_tensor(scale, ref, op, "scale", ref_name, {DType::f16}, {B, H, T, kv_value_groups(D)});
  check_tensor(zero, ref, op, "zero", ref_name, {DType::f16}, {B, H, T, kv_value_groups(D)});
}

void quantize_keys(const py::capsule& kc, const py::capsule& codes_c, const py::capsule& scale_c,
                   const py::capsule& zero_c, int bits, int group, int64_t stream) {
  constexpr const char* op = "kv_quantize_keys";
  check_bits(op, bits);
  check_group(op, group);
  const TensorView k = view_from_capsule(kc, op, "k");
  const TensorView codes = view_from_capsule(codes_c, op, "codes", true);
  const TensorView scale = view_from_capsule(scale_c, op, "scale", true);
  const TensorView zero = view_from_capsule(zero_c, op, "zero", true);
  check_key_store(k, "k", codes, scale, zero, op, bits, group);
  if (k.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, kv_quantize_keys_cuda(k, codes, scale, zero, bits, group, stream));
    return;
  }
  py::gil_scoped_release release;
  kv_quantize_keys_cpu(k, codes, scale, zero, bits, group);
}

void quantize_values(const py::capsule& vc, const py::capsule& codes_c, const py::capsule& scale_c,
                     const py::capsule& zero_c, int bits, int64_t stream) {
  constexpr const char* op = "kv_quantize_values";
  check_bits(op, bits);
  const TensorView v = view_from_capsule(vc, op, "v");
  const TensorView codes = view_from_capsule(codes_c, op, "codes", true);
  const TensorView scale = view_from_capsule(scale_c, op, "scale", true);
  const TensorView zero = view_from_capsule(zero_c, op, "zero", true);
  check_value_store(v, "v", codes, scale, zero, op, bits);
  if (v.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, kv_quantize_values_cuda(v, codes, scale, zero, bits, stream));
    return;
  }
  py::gil_scoped_release release;
  kv_quantize_values_cpu(v, codes, scale, zero, bits);
}

void dequantize_keys(const py::capsule& codes_c, const py::capsule& scale_c, const py::capsule& zero_c,
                     const py::capsule& out_c, int bits, int group, int64_t stream) {
  constexpr const char* op = "kv_dequantize_keys";
  check_bits(op, bits);
  check_group(op, group);
  const TensorView codes = view_from_capsule(codes_c, op, "codes");
  const TensorView scale = view_from_capsule(scale_c, op, "scale");
  const TensorView zero = view_from_capsule(zero_c, op, "zero");
  const TensorView out = view_from_capsule(out_c, op, "out", true);
  check_key_store(out, "out", codes, scale, zero, op, bits, group);
  if (out.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, kv_dequantize_keys_cuda(codes, scale, zero, out, bits, group, stream));
    return;
  }
  py::gil_scoped_release release;
  kv_dequantize_keys_cpu(codes, scale, zero, out, bits, group);
}

void dequantize_values(const py::capsule& codes_c, const py::capsule& scale_c, const py::capsule& zero_c,
                       const py::capsule& out_c, int bits, int64_t stream) {
  constexpr const char* op = "kv_dequantize_values";
  check_bits(op, bits);
  const TensorView codes = view_from_capsule(codes_c, op, "codes");
  const TensorView scale = view_from_capsule(scale_c, op, "scale");
  const TensorView zero = view_from_capsule(zero_c, op, "zero");
  const TensorView out = view_from_capsule(out_c, op, "out", true);
  check_value_store(out, "out", codes, scale, zero, op, bits);
  if (out.device == Device::cuda) {
    LOWBIT_RUN_CUDA(op, kv_dequantize_values_cuda(codes, scale, zero, out, bits, stream));
    return;
  }
  py::gil_scoped_release release;
  kv_dequantize_values_cpu(codes, scale, zero, out, bits);
}

// Host lengths: 0 <= lengths_q[b] <= T_q, a multiple of G; 0 <= lengths_res[b] <= R.
void check_length_values(const TensorView& lq, const TensorView& lr, int64_t Tq, int64_t R, int group,
                         const char* op) {
  const int32_t* q = lq.ptr<int32_t>();
  const int32_t* r = lr.ptr<int32_t>();
  for (int64_t b = 0; b < lq.numel(); ++b) {
    if (q[b] < 0 || q[b] > Tq || q[b] % group != 0)
      fail(op, "lengths_q[" + std::to_string(b) + "] must be a multiple of group_size " + std::to_string(group) +
                   " in [0, " + std::to_string(Tq) + "] (the quantized capacity), got " + std::to_string(q[b]));
    if (r[b] < 0 || r[b] > R)
      fail(op, "lengths_res[" + std::to_string(b) + "] must be in [0, " + std::to_string(R) +
                   "] (the window capacity R), got " + std::to_string(r[b]));
  }
}

void attention_decode(const py::capsule& q_c, const py::capsule& k_codes_c, const py::capsule& k_scale_c,
                      const py::capsule& k_zero_c, const py::capsule& v_codes_c, const py::capsule& v_scale_c,
                      const py::capsule& v_zero_c, const py::capsule& k_res_c, const py::capsule& v_res_c,
                      const py::capsule& lengths_q_c, const py::capsule& lengths_res_c, const py::capsule& out_c,
                      const std::optional<py::capsule>& workspace_c, int bits, int group, float softmax_scale,
                      int64_t stream) {
  constexpr const char* op = "quantized_attention_decode";
  check_bits(op, bits);
  check_group(op, group);
  const TensorView q = view_from_capsule(q_c, op, "q");
  KvCache c;
  c.k_codes = view_from_capsule(k_codes_c, op, "k_codes");
  c.k_scale = view_from_capsule(k_scale_c, op, "k_scale");
  c.k_zero = view_from_capsule(k_zero_c, op, "k_zero");
  c.v_codes = view_from_capsule(v_codes_c, op, "v_codes");
  c.v_scale = view_from_capsule(v_scale_c, op, "v_scale");
  c.v_zero = view_from_capsule(v_zero_c, op, "v_zero");
  c.k_res = view_from_capsule(k_res_c, op, "k_res");
  c.v_res = view_from_capsule(v_res_c, op, "v_res");
  c.lengths_q = view_from_capsule(lengths_q_c, op, "lengths_q");
  c.lengths_res = view_from_capsule(lengths_res_c, op, "lengths_res");
  const TensorView out = view_from_capsule(out_c, op, "out", true);

  check_dtype(q, op, "q", {DType::f32, DType::f16, DType::bf16});
  check_ndim(q, op, "q", 3);
  check_head_dim(op, "q", q.size(2));
  check_contiguous(q, op, "q");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  check_dtype(c.k_codes, op, "k_codes", kWords);
  check_ndim(c.k_codes, op, "k_codes", 5);
  const int64_t Hkv = c.k_codes.size(1), Tg = c.k_codes.size(2), Tq = Tg * group;
  if (Hkv < 1 || Hq % Hkv != 0)
    fail(op, "the query heads (dim 1 of q, " + std::to_string(Hq) + ") must be a multiple of the kv heads (dim 1 "
             "of k_codes, " + std::to_string(Hkv) + ")");
  check_tensor(c.k_codes, q, op, "k_codes", "q", kWords, {B, Hkv, Tg, D, kv_key_words(group, bits)});
  check_tensor(c.k_scale, q, op, "k_scale", "q", {DType::f16}, {B, Hkv, Tg, D});
  check_tensor(c.k_zero, q, op, "k_zero", "q", {DType::f16}, {B, Hkv, Tg, D});
  check_tensor(c.v_codes, q, op, "v_codes", "q", kWords, {B, Hkv, Tq, kv_value_words(D, bits)});
  check_tensor(c.v_scale, q, op, "v_scale", "q", {DType::f16}, {B, Hkv, Tq, kv_value_groups(D)});
  check_tensor(c.v_zero, q, op, "v_zero", "q", {DType::f16}, {B, Hkv, Tq, kv_value_groups(D)});
  check_ndim(c.k_res, op, "k_res", 4);
  const int64_t R = c.k_res.size(2);
  check_tensor(c.k_res, q, op, "k_res", "q", {q.dtype}, {B, Hkv, R, D});
  check_tensor(c.v_res, q, op, "v_res", "q", {q.dtype}, {B, Hkv, R, D});
  check_tensor(c.lengths_q, q, op, "lengths_q", "q", {DType::i32}, {B});
  check_tensor(c.lengths_res, q, op, "lengths_res", "q", {DType::i32}, {B});
  check_tensor(out, q, op, "out", "q", {q.dtype}, q.shape);
  if (q.device == Device::cuda) {
    if (!workspace_c) fail(op, "a CUDA call needs a workspace");
    const TensorView ws = view_from_capsule(*workspace_c, op, "workspace", true);
    check_ndim(ws, op, "workspace", 4);
    check_tensor(ws, q, op, "workspace", "q", {DType::f32}, {B, Hq, std::max<int64_t>(ws.size(2), 1), D + 2});
    LOWBIT_RUN_CUDA(op, kv_attention_decode_cuda(q, c, out, ws, bits, group, softmax_scale, stream));
    return;
  }
  check_length_values(c.lengths_q, c.lengths_res, Tq, R, group, op);
  py::gil_scoped_release release;
  kv_attention_decode_cpu(q, c, out, bits, group, softmax_scale);
}

}  // namespace

void register_kv(py::module_& m) {
  m.def("kv_quantize_keys", &quantize_keys, py::arg("k"), py::arg("codes"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("group_size"), py::arg("stream"),
        "Keys [B, H, T, D] -> codes [B, H, T/G, D, G*bits/32], scale/zero fp16 [B, H, T/G, D] (per channel).");
  m.def("kv_quantize_values", &quantize_values, py::arg("v"), py::arg("codes"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("stream"),
        "Values [B, H, T, D] -> codes [B, H, T, ceil(D/32)*bits], scale/zero fp16 [B, H, T, ceil(D/32)].");
  m.def("kv_dequantize_keys", &dequantize_keys, py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("out"),
        py::arg("bits"), py::arg("group_size"), py::arg("stream"), "Packed keys -> out [B, H, T, D].");
  m.def("kv_dequantize_values", &dequantize_values, py::arg("codes"), py::arg("scale"), py::arg("zero"),
        py::arg("out"), py::arg("bits"), py::arg("stream"), "Packed values -> out [B, H, T, D].");
  m.def("kv_attention_decode", &attention_decode, py::arg("q"), py::arg("k_codes"), py::arg("k_scale"),
        py::arg("k_zero"), py::arg("v_codes"), py::arg("v_scale"), py::arg("v_zero"), py::arg("k_res"),
        py::arg("v_res"), py::arg("lengths_q"), py::arg("lengths_res"), py::arg("out"), py::arg("workspace"),
        py::arg("bits"), py::arg("group_size"), py::arg("softmax_scale"), py::arg("stream"),
        "One query per sequence against the packed cache and the window; out [B, H_q, D].");
  m.def("kv_decode_splits", [](int64_t batch, int64_t heads_kv, int64_t heads_q, int64_t capacity, int64_t sm_count) {
    const int64_t units = heads_kv * ((heads_q / std::max<int64_t>(heads_kv, 1) + kKvCudaHeads - 1) / kKvCudaHeads);
    return kv_decode_splits(batch, units, capacity, 2 * sm_count, 2 * kKvCudaTile);
  }, py::arg("batch"), py::arg("heads_kv"), py::arg("heads_q"), py::arg("capacity"), py::arg("sm_count"),
        "Splits of the sequence the CUDA decode uses (the workspace's dim 2).");
}

}  // namespace lowbit
