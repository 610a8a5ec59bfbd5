"""Loss landscape around a sample on the plane of its adversarial direction and a random one.

For sample x with adversarial image x_adv: u = (x_adv - x)/r with r = ||x_adv - x||_2, v a
Gaussian direction made orthogonal to u and of unit norm; the grid point (a, b) is
x + r (a u + b v), so the clean image sits at (0, 0) and the adversarial one at (1, 0), and both
axes are in units of the attack's L2 distance. The grid is not clamped to [0, 1]: a clamp would
fold the plane and the picture would no longer be of a plane.

Every grid point of every chosen sample is evaluated in batched forwards (no Python loop over
points).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def landscape_directions(x: torch.Tensor, x_adv: torch.Tensor, seed: int = 0):
    """(u, v, r): unit adversarial and orthogonal random directions per sample, and r = ||delta||.
    A sample with no perturbation (r = 0) gets a random u, and r = 1 so the axes stay finite."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    flat = (x_adv - x).flatten(1).double()
    r = flat.norm(dim=1)
    rand_u = torch.randn(flat.shape, generator=gen, device=x.device, dtype=torch.float64)
    rand_v = torch.randn(flat.shape, generator=gen, device=x.device, dtype=torch.float64)
    zero = r == 0
    u = torch.where(zero[:, None], rand_u, flat)
    u = u / u.norm(dim=1, keepdim=True)
    v = rand_v - (rand_v * u).sum(1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True)
    r = torch.where(zero, torch.ones_like(r), r)
    return u.float(), v.float(), r.float()


def loss_landscape(model, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, grid: int = 21,
                   span: float = 2.0, seed: int = 0, batch_size: int = 1024) -> List[dict]:
    """Cross-entropy and correctness on a grid x grid lattice over [-span, span]^2 per sample.

    Returns one dict per sample: a, b (axis coordinates), loss [grid][grid] (rows: b, columns: a),
    correct [grid][grid] bools, radius (the L2 length of one axis unit), label, adv_pred.
    """
    if grid < 2:
        raise ValueError(f"landscape grid must be >= 2 points per axis, got {grid}")
    n = x.shape[0]
    shape = x.shape[1:]
    u, v, r = landscape_directions(x, x_adv, seed)
    coords = torch.linspace(-span, span, grid, device=x.device)
    bb, aa = torch.meshgrid(coords, coords, indexing="ij")   # rows: b, columns: a
    a_flat, b_flat = aa.reshape(-1), bb.reshape(-1)
    g2 = grid * grid
    total = n * g2
    losses = torch.empty(total, device=x.device)
    correct = torch.empty(total, dtype=torch.bool, device=x.device)
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, total, batch_size):
            idx = torch.arange(i, min(i + batch_size, total), device=x.device)
            s, p = idx // g2, idx % g2
            offs = (a_flat[p, None] * u[s] + b_flat[p, None] * v[s]) * r[s, None]
            pts = x[s] + offs.view(-1, *shape)
            logits = model(pts).float()
            losses[idx] = F.cross_entropy(logits, y[s], reduction="none")
            correct[idx] = logits.argmax(1) == y[s]
        adv_pred = model(x_adv).argmax(1)
    model.train(was)
    losses = losses.view(n, grid, grid).cpu()
    correct = correct.view(n, grid, grid).cpu()
    out = []
    for k in range(n):
        out.append({"a": coords.cpu().tolist(), "b": coords.cpu().tolist(),
                    "loss": losses[k].tolist(), "correct": correct[k].tolist(),
                    "radius": float(r[k]), "label": int(y[k]), "adv_pred": int(adv_pred[k])})
    return out


def plot_landscape(land: dict, path, title: Optional[str] = None) -> None:
    """Loss as a colour map, the incorrect region hatched and outlined; markers at the clean (0, 0)
    and adversarial (1, 0) points."""
    from aerl_fast.plotting import pyplot, save  # noqa: PLC0415
    plt = pyplot()
    import numpy as np  # noqa: PLC0415

    a, b = np.asarray(land["a"]), np.asarray(land["b"])
    loss = np.asarray(land["loss"], dtype=float)
    correct = np.asarray(land["correct"], dtype=bool)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    extent = (a[0], a[-1], b[0], b[-1])
    im = ax.imshow(np.log10(np.maximum(loss, 1e-8)), origin="lower", extent=extent, aspect="auto",
                   cmap="viridis")
    fig.colorbar(im, ax=ax, label="log10 cross-entropy")
    wrong = (~correct).astype(float)
    if 0 < wrong.sum() < wrong.size:
        ax.contourf(a, b, wrong, levels=[0.5, 1.5], colors="none", hatches=["///"])
        ax.contour(a, b, wrong, levels=[0.5], colors="white", linewidths=1.2)
    ax.plot([0], [0], "o", color="white", mec="black", label="clean")
    ax.plot([1], [0], "X", color="red", mec="black", ms=9, label="adversarial")
    ax.set_xlabel(f"adversarial direction (units of ||delta||_2 = {land['radius']:.3g})")
    ax.set_ylabel("random orthogonal direction")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "loss landscape (hatched: misclassified)", fontsize=9)
    fig.tight_layout()
    save(fig, path)
