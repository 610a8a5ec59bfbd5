"""The steps of scripts/gpu_check.sh: each runs on a CUDA device, and on the CPU (small sizes,
Triton interpreter) in tests/test_gpu_check.py."""
