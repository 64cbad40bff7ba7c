// Forward kernel, head-dim bucket 96, fp16: one instantiation per file so nvcc runs in parallel.
#include "cuda/flash_fwd_launch.cuh"

template cudaError_t fa::run_flash_fwd<fa::FwdTraits<96, false>>(const fa::FwdParams<fa::half_t>&, cudaStream_t);
