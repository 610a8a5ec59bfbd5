"""Checks the attack tests share: perturbation size, and "a batch gives what its parts give"."""
import torch


def perturbation(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 size of a - b, in float64."""
    d = (a - b).flatten(1).double()
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def assert_batch_independent(attack, model, x, y, part: int, **kw):
    """attack(model, x, y, **kw) on the whole batch equals the same attack run on consecutive parts
    of `part` rows (each passing its rows' global indices as sample_ids): flags and pass counts
    exactly, images to 1e-6.  Returns the whole batch's result."""
    n = x.shape[0]
    whole = attack(model, x, y, **kw)
    parts = [attack(model, x[i:i + part], y[i:i + part], sample_ids=torch.arange(i, min(i + part, n)), **kw)
             for i in range(0, n, part)]
    assert torch.equal(whole.fooled, torch.cat([p.fooled for p in parts]))
    assert torch.equal(whole.forwards, torch.cat([p.forwards for p in parts]))
    torch.testing.assert_close(whole.x_adv, torch.cat([p.x_adv for p in parts]), atol=1e-6, rtol=0)
    return whole
