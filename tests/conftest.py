"""Shared test settings: small thread count (2-core CI), and no test ever touches the network."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/cifar_files.py and other helpers

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    import urllib.request

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
