// NCHW <-> NHWC copies of 4-D CPU tensors (layout_cpu.cpp). Per sample such a copy is a (C, HW) <->
// (HW, C) matrix transpose, which ATen's copy runs at 7-26x the time of a clone on the CPUs measured;
// this one transposes in AVX2 registers. cpu_utils.h's in_layout calls it, so this header needs
// nothing from cpu_utils.h (no include cycle) and speaks at::MemoryFormat rather than Layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

namespace attnkern::cpu {

// t (4-D, on the CPU, dense in one of Contiguous / ChannelsLast) copied into the other one, `format`:
// always a new tensor, even where the two layouts are the same memory (C == 1 or H * W == 1).
// Bit-exact for any element size; without AVX2 (or off x86-64 / GCC) it is ATen's t.clone(format).
at::Tensor transpose_layout(const at::Tensor& t, at::MemoryFormat format);

}  // namespace attnkern::cpu
