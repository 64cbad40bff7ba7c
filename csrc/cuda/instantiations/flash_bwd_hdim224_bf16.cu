// Backward kernels (dK/dV and dQ), head-dim bucket 224, bf16: one instantiation per file so nvcc runs in parallel.
#include "cuda/flash_bwd_launch.cuh"

template cudaError_t fa::run_flash_bwd<224, true>(const fa::BwdParams<fa::bf16_t>&, cudaStream_t);
