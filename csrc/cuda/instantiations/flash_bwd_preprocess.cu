// Backward preprocess kernel (delta = rowsum(dO * O) - dlse), fp16 and bf16.
#include "cuda/flash_bwd_launch.cuh"

template cudaError_t fa::run_flash_bwd_preprocess<fa::half_t>(const fa::BwdParams<fa::half_t>&, cudaStream_t);
template cudaError_t fa::run_flash_bwd_preprocess<fa::bf16_t>(const fa::BwdParams<fa::bf16_t>&, cudaStream_t);
