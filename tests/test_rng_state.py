"""Checkpointed random streams across devices: a CPU run's state resumed on CUDA, and an older
CUDA-shaped exploration state resumed anywhere — without a GPU (CUDA's RNG calls are recorded)."""
import pytest
import torch

from aerl_fast import rng_state
from aerl_fast.seeds import derived_seed
from aerl_fast.errors import CheckpointError

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


@pytest.fixture
def cuda_rng(monkeypatch):
    """CUDA's RNG calls, recorded instead of run."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("seed", s)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, dev: calls.append(("state", st, dev)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: torch.arange(16, dtype=torch.uint8))
    return calls


def _draws(gen, n=5):
    return torch.rand(n, generator=gen)


def test_exploration_generators_live_on_the_cpu_one_per_rank():
    g0, again, g1 = (rng_state.exploration_generator(3, r) for r in (0, 0, 1))
    assert g0.device.type == "cpu"
    assert torch.equal(_draws(g0), _draws(again)) and not torch.equal(_draws(g0), _draws(g1))


def test_a_cpu_runs_state_resumes_on_cuda_with_the_same_exploration_stream(cuda_rng):
    gen = rng_state.exploration_generator(0)
    _draws(gen)  # some training happened
    saved = rng_state.capture(gen, torch.device("cpu"))
    assert "cuda" not in saved
    want_explore, want_cpu = _draws(gen), torch.rand(3)
    torch.manual_seed(99)  # the resuming process starts elsewhere
    fresh = rng_state.exploration_generator(0)
    notes = rng_state.restore(saved, fresh, CUDA, fresh_seed=1234)
    assert torch.equal(_draws(fresh), want_explore) and torch.equal(torch.rand(3), want_cpu)
    assert cuda_rng == [("seed", derived_seed(1234, 1))]  # dropout on CUDA: a fresh stream ...
    assert notes == ["the checkpoint was saved without a GPU: CUDA's random stream (dropout) "
                     "starts afresh"]  # ... and said


def test_a_cuda_runs_state_restores_cuda_and_nothing_is_said(cuda_rng):
    gen = rng_state.exploration_generator(0)
    saved = rng_state.capture(gen, CUDA)
    assert saved["cuda"].numel() == 16 and saved["explore"].numel() == gen.get_state().numel()
    assert rng_state.restore(saved, rng_state.exploration_generator(5), CUDA, fresh_seed=1) == []
    assert cuda_rng == [("state", saved["cuda"], CUDA)]
    assert rng_state.restore(saved, gen, torch.device("cpu"), fresh_seed=1) == []  # and on the CPU


def test_a_cuda_shaped_exploration_state_starts_a_fresh_cpu_stream(cuda_rng):
    saved = {"cpu": torch.get_rng_state(), "explore": torch.zeros(16, dtype=torch.uint8)}
    gen = rng_state.exploration_generator(0)
    notes = rng_state.restore(saved, gen, torch.device("cpu"), fresh_seed=77)
    want = torch.Generator().manual_seed(derived_seed(77, rng_state.EXPLORE_OFFSET))
    assert torch.equal(_draws(gen), _draws(want))  # reproducible from the seed
    assert len(notes) == 1 and "CUDA generator" in notes[0]


def test_a_corrupt_exploration_state_is_a_checkpoint_error():
    saved = {"cpu": torch.get_rng_state(), "explore": torch.zeros(100, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match="exploration RNG state has 100 bytes, expected 5056"):
        rng_state.restore(saved, rng_state.exploration_generator(0), torch.device("cpu"), 0)
