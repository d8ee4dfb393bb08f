"""Builds a DLPack capsule that claims to live on a CUDA device, to test the no-GPU error path."""
import ctypes


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int), ("dtype", _DType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class FakeCudaTensor:
    """Owns the memory behind a float32 capsule of `shape` marked as CUDA device 0 (never dereferenced)."""

    def __init__(self, shape):
        n = 1
        for s in shape:
            n *= s
        self.buffer = (ctypes.c_float * max(n, 1))()
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.managed = _Managed()
        t = self.managed.dl_tensor
        t.data = ctypes.cast(self.buffer, ctypes.c_void_p)
        t.device = _Device(2, 0)  # kDLCUDA
        t.ndim = len(shape)
        t.dtype = _DType(2, 32, 1)  # kDLFloat, 32 bits
        t.shape = self.shape
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = new(ctypes.addressof(self.managed), b"dltensor", None)
