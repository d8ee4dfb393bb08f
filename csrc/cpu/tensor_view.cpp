// TensorView helpers and the argument checks shared by every op.
#include "lowbit/tensor_view.h"

#include <cstdint>
#include <limits>
#include <sstream>

namespace lowbit {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::u8: return "uint8";
    case DType::i8: return "int8";
    case DType::i16: return "int16";
    case DType::u16: return "uint16";
    case DType::i32: return "int32";
    case DType::u32: return "uint32";
    case DType::i64: return "int64";
  }
  return "?";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: case DType::u32: return 4;
    case DType::f16: case DType::bf16: case DType::i16: case DType::u16: return 2;
    case DType::u8: case DType::i8: return 1;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // strides of an empty tensor address nothing
  int64_t expected = 1;
  for (int d = ndim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string TensorView::shape_str() const { return shape_to_string(shape); }

void check_dtype(const TensorView& t, const char* op, const char* arg, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::ostringstream s;
  s << op << ": " << arg << " must have dtype ";
  bool first = true;
  for (DType d : allowed) {
    s << (first ? "" : " or ") << dtype_name(d);
    first = false;
  }
  s << ", got " << dtype_name(t.dtype);
  throw type_error(s.str());
}

void check_ndim(const TensorView& t, const char* op, const char* arg, int ndim) {
  if (t.ndim() != ndim)
    throw std::invalid_argument(std::string(op) + ": " + arg + " must have " + std::to_string(ndim) +
                                " dimensions, got shape " + t.shape_str());
}

void check_shape(const TensorView& t, const char* op, const char* arg, const std::vector<int64_t>& shape) {
  if (t.shape != shape)
    throw std::invalid_argument(std::string(op) + ": " + arg + " must have shape " + shape_to_string(shape) +
                                ", got " + t.shape_str());
}

void check_contiguous(const TensorView& t, const char* op, const char* arg) {
  if (!t.is_contiguous())
    throw std::invalid_argument(std::string(op) + ": " + arg + " must be contiguous (shape " + t.shape_str() +
                                ", strides " + shape_to_string(t.strides) + ")");
}

void check_same_device(const TensorView& a, const TensorView& b, const char* op, const char* arg_a,
                       const char* arg_b) {
  if (a.device != b.device || a.device_id != b.device_id) {
    auto name = [](const TensorView& t) {
      return (t.device == Device::cpu ? std::string("cpu") : "cuda:" + std::to_string(t.device_id));
    };
    throw std::invalid_argument(std::string(op) + ": " + arg_a + " and " + arg_b +
                                " must be on the same device, got " + name(a) + " and " + name(b));
  }
}

void check_int32_indexable(const TensorView& t, const char* op, const char* arg) {
  if (t.numel() > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(std::string(op) + ": " + arg + " has " + std::to_string(t.numel()) +
                                " elements, more than the 2^31-1 this kernel indexes");
}

void check_aligned(const TensorView& t, const char* op, const char* arg, int bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0)
    throw std::invalid_argument(std::string(op) + ": " + arg + " must be " + std::to_string(bytes) +
                                "-byte aligned");
}

}  // namespace lowbit
