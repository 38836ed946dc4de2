// Instantiates every kernel for every type under the PyTorch extension macros (set by CMake for
// this target): any implicit half/bfloat16 conversion or operator fails to compile here.
#include <instnorm/instnorm.cuh>

template cudaError_t instnorm::forward<float>(const float*, float*, int64_t, int64_t, int64_t,
                                              const instnorm::Options&, cudaStream_t);
template cudaError_t instnorm::forward<__half>(const __half*, __half*, int64_t, int64_t, int64_t,
                                               const instnorm::Options&, cudaStream_t);
template cudaError_t instnorm::forward<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                      int64_t, int64_t, int64_t,
                                                      const instnorm::Options&, cudaStream_t);
