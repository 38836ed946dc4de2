// A downstream project: uses instnorm through find_package and the umbrella header.
#include <instnorm/instnorm.cuh>

#include <cstdio>

int main() {
  // Validation needs no GPU: an empty problem is a no-op, a null pointer is refused.
  if (instnorm::forward<float>(nullptr, nullptr, 0, 3, 4) != cudaSuccess) return 1;
  if (instnorm::forward<float>(nullptr, nullptr, 1, 3, 4) != cudaErrorInvalidValue) return 1;
  std::printf("instnorm %d.%d consumer ok\n", INSTNORM_VERSION_MAJOR, INSTNORM_VERSION_MINOR);
  return 0;
}
