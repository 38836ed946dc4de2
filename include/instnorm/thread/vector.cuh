#pragma once
/// \file thread/vector.cuh
/// fp32 <-> element type conversions with explicit intrinsics only, so that the headers compile
/// under PyTorch's __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ flags; and
/// the aligned vector type the kernels load and store.
/// Also a thread's vector I/O of a chunk and the cp.async copies (sm_80+) into shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

/// kVec elements of T, aligned to their size, moved with one load or store.
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Vector {
  T v[kVec];
};

/// One global access for the whole vector (a struct of halves would otherwise be copied member
/// by member: four 32-bit loads instead of one 128-bit load, seen in the PTX).
template <class V>
__device__ __forceinline__ V load_vector(const V* p) {
  V v;
  if constexpr (sizeof(V) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(&v, &u, 16);
  } else if constexpr (sizeof(V) == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    memcpy(&v, &u, 8);
  } else {
    v = *p;
  }
  return v;
}
template <class V>
__device__ __forceinline__ void store_vector(V* p, const V& v) {
  if constexpr (sizeof(V) == 16) {
    uint4 u;
    memcpy(&u, &v, 16);
    *reinterpret_cast<uint4*>(p) = u;
  } else if constexpr (sizeof(V) == 8) {
    uint2 u;
    memcpy(&u, &v, 8);
    *reinterpret_cast<uint2*>(p) = u;
  } else {
    *p = v;
  }
}

/// Vector -> kVec floats and back; 16-bit types convert two at a time.
template <class T, int kVec>
__device__ __forceinline__ void unpack(const Vector<T, kVec>& v, float (&f)[kVec]) {
  if constexpr (kVec % 2 == 0 && std::is_same<T, __half>::value) {
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&v.v[2 * i]));
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  } else if constexpr (kVec % 2 == 0 && std::is_same<T, __nv_bfloat16>::value) {
    // bf16 -> fp32 is a shift: done on the 32-bit word (the intrinsic's inline assembly made
    // ptxas spill the sm_90 kernels).
    uint32_t w[kVec / 2];
    memcpy(w, v.v, sizeof(w));
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) f[k] = to_float(v.v[k]);
  }
}
template <class T, int kVec>
__device__ __forceinline__ Vector<T, kVec> pack(const float (&f)[kVec]) {
  Vector<T, kVec> v;
  if constexpr (kVec % 2 == 0 && std::is_same<T, __half>::value) {
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i)
      *reinterpret_cast<__half2*>(&v.v[2 * i]) = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  } else if constexpr (kVec % 2 == 0 && std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i)
      *reinterpret_cast<__nv_bfloat162*>(&v.v[2 * i]) = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.v[k] = from_float<T>(f[k]);
  }
  return v;
}

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

/// Vectors of a chunk of `len` elements (len <= lanes * items * kVec) that lane `lane` owns:
/// vectors lane, lane + lanes, ...; the valid ones are exactly the first valid_items(...).
/// log2 of `lanes`, a power of two (plan_is_valid): one FLO instruction, where a run-time
/// division costs about 20 (block/layout.cuh).
__device__ __forceinline__ int lanes_log2(int lanes) { return 31 - __clz(lanes); }

/// `lanes` is a power of two: a shift, not a division.
template <int kVec>
__device__ __forceinline__ int valid_items(int len, int lane, int lanes, int items) {
  const int vecs = (len + kVec - 1) / kVec;
  const int n = vecs > lane ? (vecs - lane + lanes - 1) >> lanes_log2(lanes) : 0;
  return n < items ? n : items;
}

template <class T, int kVec, int kMaxItems>
__device__ __forceinline__ void load_chunk(Vector<T, kVec> (&r)[kMaxItems], const T* src,
                                           int valid, int lane, int lanes) {
  const auto* s = reinterpret_cast<const Vector<T, kVec>*>(src) + lane;
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j)
    if (j < valid) r[j] = load_vector(s + j * lanes);
}

/// Asks L2 for the line holding `p` (prefetch.global.L2): no register, no wait. For values a
/// later kernel of the same call reads first thing, which after an idle L2 would be a DRAM
/// round trip on its critical path.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#endif
}

/// Asynchronous 16-byte copy global -> shared (cp.async, sm_80 and later), bypassing L1.
__device__ __forceinline__ void copy_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}
/// Asynchronous 4-byte copy global -> shared (cp.async.ca), for a few scalars a block reads
/// later (the forward's plane map) without a register held until they arrive.
__device__ __forceinline__ void copy_async4(float* smem_dst, const float* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *smem_dst = *gmem_src;
#endif
}
/// Waits for all of this thread's cp.async copies.
__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}
/// Closes this thread's group of cp.async copies issued since the last commit.
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
/// Waits until at most kPending of this thread's committed cp.async groups are in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}


/// The part of a slice beyond the registers, held in dynamic shared memory (lanes == block):
/// each thread owns the slots j * lanes + lane, so no barrier is needed between its writes and
/// its reads. Lets a block hold up to 227 KB more on sm_90, so fewer blocks share a plane.
/// smem_fill issues the copies right after the register loads: 16-byte vectors go by cp.async,
/// all in flight at once and without registers (copying through registers four at a time made
/// a 1 MB plane on 3 blocks run at 0.71 of copy on the H100); scalars of 16-bit types, which
/// cp.async cannot move, go through registers.
template <class T, int kVec>
__device__ __forceinline__ void smem_fill(Vector<T, kVec>* sm, const T* src, int valid,
                                          int lane, int lanes) {
  const auto* s = reinterpret_cast<const Vector<T, kVec>*>(src) + lane;
  if constexpr (sizeof(Vector<T, kVec>) == 16) {
#pragma unroll 1
    for (int j = 0; j < valid; ++j) copy_async16(sm + j * lanes, s + j * lanes);
  } else {
    constexpr int kBatch = 4;  // loads in flight per thread
    int j = 0;
    for (; j + kBatch <= valid; j += kBatch) {
      Vector<T, kVec> v[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) v[b] = load_vector(s + (j + b) * lanes);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) sm[(j + b) * lanes] = v[b];
    }
    for (; j < valid; ++j) sm[j * lanes] = load_vector(s + j * lanes);
  }
}

/// Copies `n` elements of a staged unit from global to shared memory: 16-byte cp.async copies
/// (none waited for here) where the unit is 16-byte aligned, and the remainder element by
/// element; otherwise every element through registers, 8 loads in flight per thread.
template <class T>
__device__ __forceinline__ void stage_in(T* dst, const T* src, int n, bool vec_ok) {
  constexpr int kPer = 16 / int(sizeof(T));
  int done = 0;
  if (vec_ok) {
    const int nv = n / kPer;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) copy_async16(dst + i * kPer, src + i * kPer);
    done = nv * kPer;
  }
  constexpr int kInFlight = 8;
  for (int base = done; base < n; base += kInFlight * blockDim.x) {
    T v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int i = base + k * blockDim.x + threadIdx.x;
      if (i < n) v[k] = src[i];
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int i = base + k * blockDim.x + threadIdx.x;
      if (i < n) dst[i] = v[k];
    }
  }
}

/// Copies a staged unit of `n` elements from shared memory back to global memory: 16-byte
/// stores where vec_ok (dst 16-byte aligned), the rest element by element.
template <class T>
__device__ __forceinline__ void stage_out(T* dst, const T* src, int n, bool vec_ok) {
  int i0 = 0;
  if (vec_ok) {
    constexpr int kPer = 16 / int(sizeof(T));
    const int nv = n / kPer;
    for (int i = threadIdx.x; i < nv; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    i0 = nv * kPer;
  }
  for (int i = i0 + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

}  // namespace detail
}  // namespace instnorm
