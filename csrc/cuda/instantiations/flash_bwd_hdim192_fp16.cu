// Backward kernels (dK/dV and dQ), head-dim bucket 192, fp16: one instantiation per file so nvcc runs in parallel.
#include "cuda/flash_bwd_launch.cuh"

template cudaError_t fa::run_flash_bwd<192, false>(const fa::BwdParams<fa::half_t>&, cudaStream_t);
