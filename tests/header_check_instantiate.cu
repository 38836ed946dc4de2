// Instantiates every kernel (forward, backward, statistics) for every type under the PyTorch extension macros (set by CMake for
// this target): any implicit half/bfloat16 conversion or operator fails to compile here.
#include <instnorm/instnorm.cuh>

template cudaError_t instnorm::forward<float>(const float*, float*, int64_t, int64_t, int64_t,
                                              const instnorm::Options&, cudaStream_t);
template cudaError_t instnorm::forward<__half>(const __half*, __half*, int64_t, int64_t, int64_t,
                                               const instnorm::Options&, cudaStream_t);
template cudaError_t instnorm::forward<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                      int64_t, int64_t, int64_t,
                                                      const instnorm::Options&, cudaStream_t);

// The backward (and, through the forward's kernels, statistics) for every type.
#define INSTNORM_INSTANTIATE_BACKWARD(T)                                                        \
  template cudaError_t instnorm::backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                             const instnorm::Options&,                         \
                                             const instnorm::Gradients&, cudaStream_t);        \
  template cudaError_t instnorm::statistics<T>(const T*, float*, float*, int64_t, int64_t,      \
                                               int64_t, const instnorm::Options&, cudaStream_t);
INSTNORM_INSTANTIATE_BACKWARD(float)
INSTNORM_INSTANTIATE_BACKWARD(__half)
INSTNORM_INSTANTIATE_BACKWARD(__nv_bfloat16)
