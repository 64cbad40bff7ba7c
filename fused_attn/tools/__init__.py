"""Developer tools: the nvcc compile table of the CUDA kernels (cuda_compile_table)."""
