// Forward kernel, head-dim bucket 32, bf16: one instantiation per file so nvcc runs in parallel.
#include "cuda/flash_fwd_launch.cuh"

template cudaError_t fa::run_flash_fwd<fa::FwdTraits<32, true>>(const fa::FwdParams<fa::bf16_t>&, cudaStream_t);
