"""QuantizedWeight: a quantized linear weight W [out_features, in_features] in one of lowbit's formats.

Stable layout (format version 1). Codes use the canonical packing of include/lowbit/pack.h: along K (in_features),
32 codes per `bits` int32 words, little-endian; groups of `group_size` along K with a short last group.

========  ==========================================================  =====================================
format    tensors                                                     config
========  ==========================================================  =====================================
uniform   packed int32 [N, ceil(K/32)*bits], scales fp16 [N, G],      bits (2/3/4), group_size, in_features,
          zeros fp16 [N, G];  w = scales * (q - zeros)                out_features
lut       packed int32 [N, ceil(K/32)*bits], scales fp16 [N, G],      bits, group_size, in_features,
          table fp32 [2^bits];  w = scales * table[q]                 out_features
mixed     packed int32 [N, sum_g ceil(len_g/32)*bits_g], scales,      group_size, in_features, out_features
          zeros fp16 [N, G], group_bits uint8 [G] (2 or 4 per group)
vq        codes int16 [N, K/8, R] (unsigned indices < E), or uint8    vector_length (8), codebooks (R: 1 or
          [N, K/8, R] when E = 256 (half the memory); codebooks       2), entries (E: a power of two in
          fp16 [R, E, 8], scales fp16 [N];  w[n, 8j:8j+8] =           [256, 65536]), in_features (a multiple
          scales[n] * sum_r codebooks[r, codes[n, j, r]]              of 8), out_features
========  ==========================================================  =====================================

G = ceil(K / group_size). Every config also carries "format_version".

``vq`` has no groups along K (one scale per row): its ``group_size`` is None. Its ``bits`` is the index
information per weight, R * log2(E) / 8 (E = 65536, R = 1 and E = 256, R = 2 are both 2 bits), and its
``bits_per_weight`` counts each code at log2(E) bits (as a dense bit stream stores it) plus the codebooks and
scales; the int16 tensors in memory and in checkpoints hold 16 bits per code, uint8 ones 8 (``nbytes`` counts
those): :meth:`QuantizedWeight.vq` stores uint8 codes for 256-entry codebooks (AQLM 2x8: 2 bits per weight).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import torch

from lowbit.ops import pack as _pack
from lowbit.ops.vq_gemm import VQ_CODEBOOKS, VQ_MAX_ENTRIES, VQ_MIN_ENTRIES, VQ_VECTOR_LENGTH, vq_dequantize

FORMAT_VERSION = 1
FORMATS = ("uniform", "lut", "mixed", "vq")
GROUP_SIZES = (32, 64, 128)
#: The tensors of each format, the first one naming the weight's device.
TENSOR_NAMES: dict[str, tuple[str, ...]] = {
    "uniform": ("packed", "scales", "zeros"), "lut": ("packed", "scales", "table"),
    "mixed": ("packed", "scales", "zeros", "group_bits"), "vq": ("codes", "codebooks", "scales")}
_INT_KEYS = {"uniform": ("in_features", "out_features", "group_size", "bits"),
             "lut": ("in_features", "out_features", "group_size", "bits"),
             "mixed": ("in_features", "out_features", "group_size"),
             "vq": ("in_features", "out_features", "vector_length", "codebooks", "entries")}


class QuantizedWeight:
    """A validated quantized weight: a format name, its tensors and a small JSON-able config.

    Args:
        format: one of ``FORMATS``.
        tensors: the format's tensors (see the module docstring), all on one device.
        config: ``in_features``, ``out_features``, ``group_size`` and (uniform, lut) ``bits``; for vq
            ``vector_length``, ``codebooks`` and ``entries`` instead of ``group_size`` and ``bits``.

    Raises:
        ValueError / TypeError naming the tensor or key, what was expected and what came.
    """

    def __init__(self, format: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format = format
        self.tensors = dict(tensors)
        self.config = dict(config)
        self.config.setdefault("format_version", FORMAT_VERSION)
        self.validate()

    # -- construction from codes -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int) -> "QuantizedWeight":
        """Packs uint8 codes [N, K] into the ``uniform`` format (w = scales * (q - zeros))."""
        n, k = codes.shape
        return cls("uniform", {"packed": _pack.pack_uniform(codes, bits), "scales": scales.to(torch.float16),
                               "zeros": zeros.to(torch.float16)},
                   {"bits": bits, "group_size": group_size, "in_features": k, "out_features": n})

    @classmethod
    def lut(cls, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
            group_size: int) -> "QuantizedWeight":
        """Packs uint8 codes [N, K] into the ``lut`` format (w = scales * table[q])."""
        n, k = codes.shape
        return cls("lut", {"packed": _pack.pack_uniform(codes, bits), "scales": scales.to(torch.float16),
                           "table": table.to(torch.float32)},
                   {"bits": bits, "group_size": group_size, "in_features": k, "out_features": n})

    @classmethod
    def mixed(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_bits: torch.Tensor,
              group_size: int) -> "QuantizedWeight":
        """Packs uint8 codes [N, K] into the ``mixed`` format, group g at group_bits[g] (2 or 4) bits."""
        n, k = codes.shape
        group_bits = group_bits.to(torch.uint8)
        return cls("mixed", {"packed": _pack.pack_mixed(codes, group_bits, group_size),
                             "scales": scales.to(torch.float16), "zeros": zeros.to(torch.float16),
                             "group_bits": group_bits},
                   {"group_size": group_size, "in_features": k, "out_features": n})

    @classmethod
    def vq(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> "QuantizedWeight":
        """The ``vq`` format from integer indices [N, K/8, R] (each in [0, E)), codebooks [R, E, 8] and row scales
        [N]; indices are stored as uint8 for E = 256, else as int16 holding their unsigned 16-bit value, codebooks
        and scales as fp16."""
        n, j, r = codes.shape
        codes = codes.to(torch.int32)
        if codebooks.shape[1] <= 256:
            stored = codes.to(torch.uint8)
        else:
            stored = torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16)
        tensors = {"codes": stored, "codebooks": codebooks.to(torch.float16), "scales": scales.to(torch.float16)}
        return cls("vq", tensors,
                   {"vector_length": VQ_VECTOR_LENGTH, "codebooks": r, "entries": int(codebooks.shape[1]),
                    "in_features": j * VQ_VECTOR_LENGTH, "out_features": n})

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes [N, K]; for ``vq`` the codebook indices [N, K/8, R] as int32 in [0, E)."""
        if self.format == "vq":
            return self.tensors["codes"].to(torch.int32) & 0xFFFF
        if self.format == "mixed":
            return _pack.unpack_mixed(self.tensors["packed"], self.tensors["group_bits"], self.group_size,
                                      self.in_features)
        return _pack.unpack(self.tensors["packed"], self.config["bits"], self.in_features)

    # -- shape facts -------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return int(self.config["in_features"])

    @property
    def out_features(self) -> int:
        return int(self.config["out_features"])

    @property
    def group_size(self) -> Optional[int]:
        """Weights per scale along K; None for ``vq`` (one scale per row, no groups)."""
        return None if self.format == "vq" else int(self.config["group_size"])

    @property
    def bits(self) -> float:
        """Code width; for ``mixed`` the average over groups (weighted by group length); for ``vq`` the index
        bits per weight, codebooks * log2(entries) / vector_length."""
        if self.format == "vq":
            return self.config["codebooks"] * math.log2(self.config["entries"]) / VQ_VECTOR_LENGTH
        if self.format == "mixed":
            g = self.tensors["group_bits"].to(torch.float64)
            lengths = torch.full_like(g, float(self.group_size))
            lengths[-1] = self.in_features - self.group_size * (len(g) - 1)
            return float((g * lengths).sum() / self.in_features)
        return float(self.config["bits"])

    @property
    def device(self) -> torch.device:
        return self.tensors[TENSOR_NAMES[self.format][0]].device

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (codes, scales, zeros, tables)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight including scales, zeros and tables (padding included); for ``vq`` the codes
        at log2(entries) bits each plus the codebooks and scales (see the module docstring)."""
        if self.format == "vq":
            t = self.tensors
            side = sum(t[name].numel() * t[name].element_size() for name in ("codebooks", "scales"))
            return self.bits + 8.0 * side / (self.in_features * self.out_features)
        return 8.0 * self.nbytes / (self.in_features * self.out_features)

    def layout(self) -> str:
        """The format's parameters as text: bits and group size, or for ``vq`` bits, codebooks and entries."""
        if self.format == "vq":
            return f"bits={self.bits:g}, codebooks={self.config['codebooks']}, entries={self.config['entries']}"
        return f"bits={self.bits:g}, group_size={self.group_size}"

    # -- validation --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Checks config keys, tensor names, dtypes, shapes and devices; raises on the first problem."""
        cfg = self.config
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"config format_version must be {FORMAT_VERSION}, got {cfg.get('format_version')!r}")
        for key in _INT_KEYS[self.format]:
            if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
                raise TypeError(f"config[{key!r}] must be an int, got {cfg.get(key)!r}")
        n, k = self.out_features, self.in_features
        if n < 0 or k < 1:
            raise ValueError(f"config in_features must be >= 1 and out_features >= 0, got {k} and {n}")
        expected = TENSOR_NAMES[self.format]
        if set(self.tensors) != set(expected):
            raise ValueError(f"{self.format} tensors must be {sorted(expected)}, got {sorted(self.tensors)}")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"tensor {name!r} is on {t.device}, but {expected[0]} is on {self.device}")
        if self.format == "vq":
            self._validate_vq()
        else:
            self._validate_grouped()

    def _validate_grouped(self) -> None:
        """The checks of the grouped formats (uniform, lut, mixed)."""
        cfg, n, k, gs = self.config, self.out_features, self.in_features, self.group_size
        if gs not in GROUP_SIZES:
            raise ValueError(f"config group_size must be one of {GROUP_SIZES}, got {gs}")
        if self.format != "mixed" and cfg["bits"] not in (2, 3, 4):
            raise ValueError(f"config bits must be 2, 3 or 4, got {cfg['bits']}")
        groups = math.ceil(k / gs)
        if self.format == "mixed":
            gb = self.tensors["group_bits"]
            self._check("group_bits", torch.uint8, [groups])
            if not bool(((gb == 2) | (gb == 4)).all()):
                raise ValueError("tensor 'group_bits' must hold only 2 and 4")
            words = _pack.mixed_words_per_row(k, gb, gs)
        else:
            words = _pack.words_per_row(k, cfg["bits"])
        self._check("packed", (torch.int32,), [n, words])
        self._check("scales", torch.float16, [n, groups])
        if "zeros" in self.tensors:
            self._check("zeros", torch.float16, [n, groups])
        if "table" in self.tensors:
            self._check("table", torch.float32, [2 ** cfg["bits"]])

    def _validate_vq(self) -> None:
        """The checks of the ``vq`` format, indices < entries included."""
        cfg, n, k = self.config, self.out_features, self.in_features
        v, r, e = cfg["vector_length"], cfg["codebooks"], cfg["entries"]
        if v != VQ_VECTOR_LENGTH:
            raise ValueError(f"config vector_length must be {VQ_VECTOR_LENGTH}, got {v}")
        if k % v:
            raise ValueError(f"config in_features must be a multiple of vector_length {v}, got {k}")
        if r not in VQ_CODEBOOKS:
            raise ValueError(f"config codebooks must be one of {VQ_CODEBOOKS}, got {r}")
        if not (VQ_MIN_ENTRIES <= e <= VQ_MAX_ENTRIES and e & (e - 1) == 0):
            raise ValueError(f"config entries must be a power of two in [{VQ_MIN_ENTRIES}, {VQ_MAX_ENTRIES}], "
                             f"got {e}")
        self._check("codes", (torch.int16, torch.uint8) if e == 256 else torch.int16, [n, k // v, r])
        self._check("codebooks", torch.float16, [r, e, v])
        self._check("scales", torch.float16, [n])
        if e < 2**16 and self.tensors["codes"].numel():
            largest = int(self.codes().max())
            if largest >= e:
                raise ValueError(f"tensor 'codes' must hold indices < entries ({e}), got {largest}")

    def _check(self, name: str, dtype: Union[torch.dtype, tuple], shape: list) -> None:
        t = self.tensors[name]
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            raise TypeError(f"tensor {name!r} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if list(t.shape) != list(shape):
            raise ValueError(f"tensor {name!r} must have shape {list(shape)}, got {list(t.shape)}")

    # -- use ---------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features] this represents, in `dtype`."""
        t, k, gs = self.tensors, self.in_features, self.group_size
        if self.format == "vq":
            return vq_dequantize(t["codes"], t["codebooks"], t["scales"], dtype)
        if self.format == "uniform":
            return _pack.dequantize_uniform(t["packed"], t["scales"], t["zeros"], self.config["bits"], gs, k, dtype)
        if self.format == "lut":
            return _pack.dequantize_lut(t["packed"], t["scales"], t["table"], self.config["bits"], gs, k, dtype)
        return _pack.dequantize_mixed(t["packed"], t["scales"], t["zeros"], t["group_bits"], gs, k, dtype)

    def to(self, device: Union[str, torch.device]) -> "QuantizedWeight":
        """A copy with every tensor on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return QuantizedWeight(self.format, {k: v.to(device) for k, v in self.tensors.items()}, self.config)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, config) in the stable layout, for checkpoints; the inverse is the constructor."""
        return dict(self.tensors), dict(self.config, format=self.format)

    def __repr__(self) -> str:
        return (f"QuantizedWeight(format={self.format}, {self.layout()}, "
                f"shape=[{self.out_features}, {self.in_features}], {self.bits_per_weight:.2f} bits/weight stored, "
                f"device={self.device})")


__all__ = ["QuantizedWeight", "FORMATS", "FORMAT_VERSION", "GROUP_SIZES", "TENSOR_NAMES"]
