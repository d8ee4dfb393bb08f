// What the CPU async-dequant and mixed GEMMs share between their driver (gemm_async_dequant.cpp) and their
// AVX-512 VNNI row kernels (gemm_async_dequant_vnni.cpp): the arguments of one call and the row-kernel tables.
#pragma once
#include <cstdint>
#include <vector>

namespace lowbit {
namespace async_cpu {

constexpr int kMaxMr = 4;  // rows of x a row kernel multiplies at once

// One segment of a mixed row: the xq column of each of its runs (32 runs[s]). The runs of a segment are whole
// K-groups in K order (the binding checks it), so a group's sums are flushed after every RPG-th run
// (RPG = group_size / 32) and after the segment's last run (a short last group of K).
struct MixedSegment {
  int64_t byte_offset;  // of the segment inside a row
  int64_t count;        // runs
  const int64_t* xcol;
};

struct VnniPlan;

// A segment of a row as its runs' source: width, bytes inside a row, runs, and the xq column of each run
// (nullptr: run r is column 32 r).
struct RunSource {
  int bits;
  int64_t byte_offset, count;
  const int64_t* xcol;
};

struct AsyncArgs {
  const int8_t* xq;
  const uint8_t* xa;  // AVX2 table mode: |xq| (else nullptr)
  int64_t kp;         // padded K of xq
  const float* d;     // [M, groups]
  const float* u;     // [M, groups]: d * (sum of the group's xq), the zero correction's activation factor
  const uint8_t* packed;
  int64_t row_bytes;
  const uint16_t* scales;
  const uint16_t* zeros;  // nullptr: zero = 0
  const uint32_t* tq;     // table mode: the 16 int8 table bytes as 4 words (else nullptr)
  float ts;               // table_scale (1 without a table)
  int64_t groups, k, m, n;
  int bits, group_size;
  float* y;                   // [M, N] fp32
  const MixedSegment* mixed;  // mixed layout: the 4-bit and the 2-bit segment (else nullptr)
  const VnniPlan* vnni;       // the AVX-512 kernels' staged activations (else nullptr)
};

// The segments of a's layout into src (the plain layout: one, of ceil(K / 32) runs; the mixed one: the 4-bit
// and the 2-bit segment); returns how many.
inline int run_sources(const AsyncArgs& a, RunSource* src) {
  if (!a.mixed) {
    src[0] = {a.bits, 0, (a.k + 31) / 32, nullptr};
    return 1;
  }
  src[0] = {4, a.mixed[0].byte_offset, a.mixed[0].count, a.mixed[0].xcol};
  src[1] = {2, a.mixed[1].byte_offset, a.mixed[1].count, a.mixed[1].xcol};
  return 2;
}

using RowsFn = void (*)(const AsyncArgs&, int64_t row, int64_t m0);
struct RowsFnTable {
  RowsFn by_mr[kMaxMr];  // by rows of x - 1
};

// Kernel tables by table mode (0, 1), bits (2, 4 -> 0, 1) and group size (32, 64, 128 -> 0, 1, 2), and the
// mixed-layout kernels by group size.
struct RowsKernels {
  RowsFnTable by_mode_bits_group[2][2][3];
  RowsFnTable mixed[3];
};

// The AVX-512 VNNI path. Its row kernels read the activations of each segment staged in "pair order" (the 64
// bytes a 512-bit load of two 32-byte chunks meets) and each flush's group from a table, both made once per
// call by make_vnni_plan; its table mode multiplies offset-binary table bytes (tq + 128, unsigned for vpdpbusd)
// and subtracts the 128 * sum(xq) this adds from the int32 sums of each flush (VnniPlan::xc), so its integers
// are exact as on the other paths.
struct VnniSegment {
  int64_t byte_offset;  // of the segment's codes inside a row
  int64_t supers;       // 64-byte loads (pairs of chunks); the last one may hold one chunk
  bool half_tail;       // the last load holds one chunk (masked)
  int64_t x_offset;     // of the segment's staged activations inside a staged row
  int64_t fg_offset;    // of its flush groups inside VnniPlan::fg
};
struct VnniPlan {
  std::vector<int8_t> xs;   // [M, stride] staged activations
  std::vector<int32_t> fg;  // per segment: [supers, flushes per super, 2 halves] group index (groups: padding)
  std::vector<int32_t> xc;  // table mode: [M, flush slots, 16], 128 * sum(xq) of a flush's half h in lane 8 h
  int64_t stride = 0;
  int64_t slots = 0;  // flushes over all segments (fg.size() / 2)
  VnniSegment seg[2] = {};  // the plain layout uses seg[0], the mixed one both (4-bit, then 2-bit)
};
VnniPlan make_vnni_plan(const AsyncArgs& a);
const RowsKernels& vnni_kernels();

// The AMX-INT8 path (gemm_async_dequant_amx.cpp) for a.m >= kAmxMinRows: all of a.y, plain or mixed layout,
// table mode or not, in parallel (OpenMP). Only called at the amx level of cpu_isa.h.
constexpr int64_t kAmxMinRows = 16;
void amx_gemm(const AsyncArgs& a);

}  // namespace async_cpu
}  // namespace lowbit
