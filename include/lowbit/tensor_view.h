// TensorView: a non-owning view of a tensor (pointer, dtype, shape, strides, device) that kernels take,
// and the argument checks every entry point runs before touching memory. Errors name the argument.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowbit {

enum class DType { f32, f16, bf16, f64, u8, i8, i16, i32, u32, i64, u16 };
enum class Device { cpu, cuda };

const char* dtype_name(DType t);
int dtype_size(DType t);

// Raised for a wrong dtype; the bindings turn it into Python's TypeError (std::invalid_argument -> ValueError).
struct type_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements

  int ndim() const { return int(shape.size()); }
  int64_t size(int dim) const { return shape.at(dim < 0 ? dim + ndim() : dim); }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_str() const;
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

// Checks: each throws with a message of the form "<op>: <arg> must ..., got ...".
void check_dtype(const TensorView& t, const char* op, const char* arg, std::initializer_list<DType> allowed);
void check_ndim(const TensorView& t, const char* op, const char* arg, int ndim);
void check_shape(const TensorView& t, const char* op, const char* arg, const std::vector<int64_t>& shape);
void check_contiguous(const TensorView& t, const char* op, const char* arg);
void check_same_device(const TensorView& a, const TensorView& b, const char* op, const char* arg_a, const char* arg_b);
void check_int32_indexable(const TensorView& t, const char* op, const char* arg);
void check_aligned(const TensorView& t, const char* op, const char* arg, int bytes);
std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace lowbit
