"""Inside tests/kernels the dispatch must pick the Triton kernels (the interpreter on CPU);
otherwise every kernel test here would silently test the reference against itself."""
import pytest

import aerl_fast.kernels as k
from aerl_fast.kernels import pg_loss_triton


@pytest.mark.skipif(not pg_loss_triton.INTERPRETED, reason="no interpreter (a GPU run): CPU tensors run "
                                                    "the reference there")
def test_kernel_tests_run_triton():
    assert k.backend("cpu") == "triton"
    assert k.backend("cpu", op="pgd_step") == "triton"
