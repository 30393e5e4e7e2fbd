// What every compiled CPU kernel shares; built first in the one translation unit of
// kernels/_cpu_build.py (SOURCES).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>

// Whether this build has the kernels' AVX-512 paths (else their functions are stubs that raise).
bool avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// body(begin, end) over contiguous ranges of [0, n), on the calling thread's OpenMP team: the
// size torch.set_num_threads gave this thread, as torch's own ops use. Not at::parallel_for: its
// inline once-per-thread init, compiled into this module with its own thread-local flag, would
// run again on each thread's first call and reset the thread's count to whatever count was set
// last on any thread (an adapter-load worker's 1). body must not throw.
template <typename Body>
void parallel_rows(int64_t n, const Body& body) {
  const int64_t team = std::min<int64_t>(omp_in_parallel() ? 1 : omp_get_max_threads(), n);
  if (team <= 1) {
    if (n > 0) body(0, n);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(team))
  {
    const int64_t size = omp_get_num_threads(), chunk = (n + size - 1) / size;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) body(begin, end);
  }
}
