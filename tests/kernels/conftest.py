"""tests/kernels run the Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is first imported (its own tl.* helpers are decorated
then, and so are our kernels when `aerl_fast.kernels` is imported); setting it here (pytest loads
this file before the test modules) does that unless the caller already chose.  The interpreter
costs milliseconds per program instance, so every test keeps shapes tiny and launches few
programs.

Triton reads the variable when it is imported, so it holds for the whole pytest process.  When
this file is what turned it on (a run over all of tests/), it also sets AERL_FAST_KERNELS=reference
for the process and lifts it only around the tests of this directory: elsewhere the fused ops run
the torch reference on CPU, as they would without the interpreter, instead of paying the
interpreter's milliseconds per program in every training or attack test.  If something imported
triton before this file ran, these tests skip with a reason; run them in their own process then
(`TRITON_INTERPRET=1 pytest tests/kernels`, the CI command).
"""
import os
import sys

_WE_SET_INTERPRET = os.environ.get("_AERL_FAST_TESTS_SET_INTERPRET") == "1" or (
    "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules)  # tests/conftest.py or here
if _WE_SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("AERL_FAST_KERNELS", "reference")  # for the other test directories

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # kernel_refs, shared with bench/bench_kernels.py


@pytest.fixture(autouse=True)
def _kernels_dispatch_to_triton(monkeypatch):
    """Inside tests/kernels the dispatch picks Triton (the interpreter on CPU) again."""
    if _WE_SET_INTERPRET and os.environ.get("AERL_FAST_KERNELS") == "reference":
        monkeypatch.delenv("AERL_FAST_KERNELS")


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh random inputs, the same on every run."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g
