#pragma once
/// \file detail/convert.cuh
/// fp32 <-> element type conversions with explicit intrinsics only, so that the headers compile
/// under PyTorch's __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ flags; and
/// the aligned vector type the kernels load and store.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace instnorm {
namespace detail {

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/// kVec elements of T, aligned to their size, moved with one load or store. 16-bit types are
/// kept as 32-bit words of two elements so that they live in registers as packed pairs.
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Vector {
  T v[kVec];
  __device__ __forceinline__ float get(int k) const { return to_float(v[k]); }
  __device__ __forceinline__ void set(int k, float f) { v[k] = from_float<T>(f); }
};
template <int kVec>
struct alignas(2 * kVec) Vector<__half, kVec> {
  __half2 w[kVec / 2];
  __device__ __forceinline__ float get(int k) const {
    return k % 2 ? __high2float(w[k / 2]) : __low2float(w[k / 2]);
  }
  __device__ __forceinline__ void set(int k, float f) {
    if (k % 2) w[k / 2] = __halves2half2(__low2half(w[k / 2]), __float2half_rn(f));
    else w[k / 2] = __halves2half2(__float2half_rn(f), __high2half(w[k / 2]));
  }
};
template <int kVec>
struct alignas(2 * kVec) Vector<__nv_bfloat16, kVec> {
  __nv_bfloat162 w[kVec / 2];
  __device__ __forceinline__ float get(int k) const {
    return k % 2 ? __high2float(w[k / 2]) : __low2float(w[k / 2]);
  }
  __device__ __forceinline__ void set(int k, float f) {
    if (k % 2) w[k / 2] = __halves2bfloat162(__low2bfloat16(w[k / 2]), __float2bfloat16_rn(f));
    else w[k / 2] = __halves2bfloat162(__float2bfloat16_rn(f), __high2bfloat16(w[k / 2]));
  }
};
template <>
struct alignas(2) Vector<__half, 1> {
  __half v[1];
  __device__ __forceinline__ float get(int) const { return __half2float(v[0]); }
  __device__ __forceinline__ void set(int, float f) { v[0] = __float2half_rn(f); }
};
template <>
struct alignas(2) Vector<__nv_bfloat16, 1> {
  __nv_bfloat16 v[1];
  __device__ __forceinline__ float get(int) const { return __bfloat162float(v[0]); }
  __device__ __forceinline__ void set(int, float f) { v[0] = __float2bfloat16_rn(f); }
};

/// The element types the library is instantiated for.
template <class T>
struct is_supported {
  static constexpr bool value = false;
};
template <>
struct is_supported<float> {
  static constexpr bool value = true;
};
template <>
struct is_supported<__half> {
  static constexpr bool value = true;
};
template <>
struct is_supported<__nv_bfloat16> {
  static constexpr bool value = true;
};

}  // namespace detail
}  // namespace instnorm
