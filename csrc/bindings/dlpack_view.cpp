// DLPack capsule -> TensorView, with dtype/device mapping and clear errors for what lowbit cannot take.
// In the CUDA emulator's module (LOWBIT_CUDA_EMULATION) CPU tensors are the device's tensors: each view points
// at a guarded device copy of the tensor for the duration of the op (cuda_emu/memory.h).
#include "bindings/dlpack_view.h"

#include <dlpack.h>

#include <cstring>
#include <string>

#ifdef LOWBIT_CUDA_EMULATION
#include "cuda_emu/memory.h"
#endif

namespace lowbit {
namespace {

DType map_dtype(DLDataType t, const char* op, const char* arg) {
  if (t.lanes != 1) throw type_error(std::string(op) + ": " + arg + " has vector lanes, which lowbit does not take");
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 32) return DType::f32;
      if (t.bits == 16) return DType::f16;
      if (t.bits == 64) return DType::f64;
      break;
    case kDLBfloat:
      if (t.bits == 16) return DType::bf16;
      break;
    case kDLInt:
      if (t.bits == 8) return DType::i8;
      if (t.bits == 16) return DType::i16;
      if (t.bits == 32) return DType::i32;
      if (t.bits == 64) return DType::i64;
      break;
    case kDLUInt:
      if (t.bits == 8) return DType::u8;
      if (t.bits == 16) return DType::u16;
      if (t.bits == 32) return DType::u32;
      break;
    default:
      break;
  }
  throw type_error(std::string(op) + ": " + arg + " has a dtype lowbit does not take (DLPack code " +
                   std::to_string(t.code) + ", " + std::to_string(t.bits) + " bits)");
}

#ifdef LOWBIT_CUDA_EMULATION
// Bytes from the first element to one past the last (strides are never negative in torch).
size_t extent_bytes(const TensorView& v) {
  if (v.numel() == 0) return 0;
  int64_t last = 0;
  for (int d = 0; d < v.ndim(); ++d) last += (v.shape[size_t(d)] - 1) * v.strides[size_t(d)];
  return size_t(last + 1) * size_t(dtype_size(v.dtype));
}
#endif

TensorView from_dltensor(const DLTensor& t, const char* op, const char* arg, bool writable) {
  TensorView v;
  v.dtype = map_dtype(t.dtype, op, arg);
  if (t.device.device_type == kDLCPU) {
    v.device = Device::cpu;
  } else if (t.device.device_type == kDLCUDA) {
    v.device = Device::cuda;
  } else {
    throw std::invalid_argument(std::string(op) + ": " + arg + " is on a device lowbit does not support (DLPack device " +
                                std::to_string(t.device.device_type) + ")");
  }
  v.device_id = t.device.device_id;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides) {
    v.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    v.strides.assign(t.ndim, 1);
    for (int d = t.ndim - 2; d >= 0; --d) v.strides[d] = v.strides[d + 1] * v.shape[d + 1];
  }
#ifdef LOWBIT_CUDA_EMULATION
  if (v.device == Device::cuda)
    throw std::invalid_argument(std::string(op) + ": " + arg + " is a CUDA tensor, but this is the CUDA emulator, whose "
                                "device tensors are CPU tensors");
  v.device = Device::cuda;
  v.data = emu::shadow_tensor(v.data, extent_bytes(v), writable, std::string(op) + " argument '" + arg + "'");
#else
  (void)writable;
#endif
  return v;
}

}  // namespace

TensorView view_from_capsule(const pybind11::capsule& capsule, const char* op, const char* arg, bool writable) {
  const char* name = capsule.name();
  if (name && std::strcmp(name, "dltensor") == 0) {
    auto* managed = capsule.get_pointer<DLManagedTensor>();
    return from_dltensor(managed->dl_tensor, op, arg, writable);
  }
  if (name && std::strcmp(name, "dltensor_versioned") == 0) {
    auto* managed = capsule.get_pointer<DLManagedTensorVersioned>();
    if (managed->version.major != DLPACK_MAJOR_VERSION)
      throw std::invalid_argument(std::string(op) + ": " + arg + " uses DLPack major version " +
                                  std::to_string(managed->version.major) + ", lowbit reads " +
                                  std::to_string(DLPACK_MAJOR_VERSION));
    if (writable && (managed->flags & DLPACK_FLAG_BITMASK_READ_ONLY))
      throw std::invalid_argument(std::string(op) + ": " + arg + " is read-only but is written to");
    return from_dltensor(managed->dl_tensor, op, arg, writable);
  }
  throw pybind11::type_error(std::string(op) + ": " + arg + " must be a DLPack capsule, got one named '" +
                             (name ? name : "") + "'");
}

}  // namespace lowbit
