"""Inside tests/kernels the dispatch must pick the Triton kernels (the interpreter on CPU);
otherwise every kernel test here would silently test the reference against itself."""
import aerl_fast.kernels as k


def test_kernel_tests_run_triton():
    assert k.backend("cpu") == "triton"
    assert k.backend("cpu", op="pgd_step") == "triton"
