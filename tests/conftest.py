"""Shared test settings: small thread count (2-core CI), and no test ever touches the network."""
import os
import sys

# Triton reads TRITON_INTERPRET once, at import: choose the interpreter before anything imports it,
# so tests/kernels run the kernels on CPU whatever order pytest collects in.  Elsewhere the fused ops
# keep the torch reference (AERL_FAST_KERNELS=reference; tests/kernels/conftest.py lifts it there).
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("AERL_FAST_KERNELS", "reference")
    os.environ["_AERL_FAST_TESTS_SET_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/cifar_files.py and other helpers

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    import urllib.request

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
