"""torchrun --nproc_per_node=2 on CPU (gloo): DDP keeps the replicas identical, a step on two ranks
equals the single-process step on the same global batch, evaluation shards add up, only rank 0
writes, and a distributed run resumes to the same weights as an uninterrupted one.

Every case launches real worker processes through `python -m torch.distributed.run --standalone`
(a free rendezvous port is picked by torchrun itself).  The step-equivalence case runs this very
file as the worker script (see `_equivalence_job` and the `__main__` block at the bottom).
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = ["--dataset", "shapes", "--model", "alicnn", "--width", "0.25", "--train-subset", "256",
        "--batch-size", "32", "--no-progress", "--eval-batch-size", "256"]
TIMEOUT = 240


def _torchrun_cmd(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(*args, nproc=2):
    r = subprocess.run(_torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=TIMEOUT, env=_env())
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def train_ddp(*argv, nproc=2):
    return torchrun("-m", "aerl_fast.train", *argv, nproc=nproc)


def _weights(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / name, weights_only=True)["model"]


def _log(run_dir, drop=("images_per_s", "epoch_s")):
    return [{k: v for k, v in json.loads(ln).items() if k not in drop}
            for ln in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    """An uninterrupted 2-epoch RL run on two ranks (the reference for several tests)."""
    out = tmp_path_factory.mktemp("ddp") / "ref"
    r = train_ddp(*TINY, "--objective", "rl", "--epochs", "2", "--out", str(out))
    return out, r


def test_ddp_run_writes_once_keeps_replicas_identical_and_shards_evaluation(rl_run):
    out, r = rl_run
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]  # rank 0 alone writes the log: no duplicate lines
    for ln in lines:
        assert ln["world_size"] == 2
        assert ln["rank_weight_spread"] == 0.0  # all-reduced checksum spread across the two replicas
        assert 0 <= ln["train_reward"] <= 1 and 0 <= ln["val_acc"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["best_val_acc"] == max(ln["val_acc"] for ln in lines)
    assert r.stdout.count("done:") == 1 and r.stderr.count("epoch 2/2") == 1  # one rank speaks
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.pt.*"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped module's state_dict
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["explore"], ckpt["rng_ranks"][1]["explore"])
    # sharded test evaluation (each rank half the set, counts summed) equals a single-process evaluation
    import aerl_fast
    model = aerl_fast.load_model(out)
    x, y, _ = aerl_fast.load_dataset("shapes", None, "test")
    with torch.no_grad():
        xb = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).float() / 255
        acc = (model(xb).argmax(1) == torch.from_numpy(y.copy())).float().mean().item()
    assert abs(acc - summary["test_acc"]) < 1e-6


def test_two_ranks_step_equals_single_process_global_batch(tmp_path):
    """The product's Trainer under torchrun against a single-process reference on the same global
    batches.  Dropout is per rank by design, so the exact comparison runs the model in eval mode
    (AliCNN has no BatchNorm): then a DDP step must equal the single-process step up to float
    rounding, gradients included (a wrong shard or a sum instead of a mean would show).  The same
    job then trains in train mode, dropout on, and checks the replicas' spread after every step."""
    r = torchrun(__file__, "equivalence", str(tmp_path / "job"))
    assert "equivalence ok" in r.stdout, r.stdout + r.stderr


def test_an_image_folder_is_decoded_by_rank_0_and_read_from_its_cache_by_the_others(tmp_path):
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    for c in range(2):
        d = tmp_path / "tree" / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(torch.randint(0, 256, (13 + i, 17, 3), generator=rng, dtype=torch.uint8).numpy()
                            ).save(d / f"{i}.png")
    r = torchrun(__file__, "main_first", str(tmp_path / "tree"))
    assert "main_first ok" in r.stdout, r.stdout + r.stderr


def test_resume_of_a_distributed_run_reproduces_the_uninterrupted_run(rl_run, tmp_path):
    ref, _ = rl_run
    out = tmp_path / "resumed"
    train_ddp(*TINY, "--objective", "rl", "--epochs", "1", "--out", str(out))
    r = train_ddp("--resume", str(out), "--epochs", "2", "--no-progress")
    assert "resuming" in r.stderr
    _assert_same_weights(ref, out)
    assert _log(ref) == _log(out)


def test_global_batch_must_split_evenly(tmp_path):
    r = subprocess.run(_torchrun_cmd("-m", "aerl_fast.train", *TINY, "--batch-size", "31", "--epochs", "1",
                                     "--out", str(tmp_path / "r")),
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT, env=_env())
    assert r.returncode != 0
    assert r.stderr.count("error: --batch-size 31 is the global batch") == 1  # said once, by rank 0
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.slow
def test_killed_distributed_run_resumes_mid_epoch(rl_run, tmp_path):
    """SIGTERM to torchrun while it checkpoints after every batch, then --resume under torchrun:
    wherever the kill landed, the final weights equal the uninterrupted run's."""
    ref, _ = rl_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_cmd("-m", "aerl_fast.train", *TINY, "--objective", "rl", "--epochs", "2",
                                          "--checkpoint-minutes", "1e-9", "--out", str(out)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(), start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "last.pt").exists():
                st = torch.load(out / "last.pt", weights_only=True)
                if st["epoch"] == 0 and st["step"] >= 3:
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    st = torch.load(out / "last.pt", weights_only=True)  # readable: written atomically by rank 0
    assert st["epoch"] < 2 and not (out / "summary.json").exists()  # training was left to do
    r = train_ddp("--resume", str(out), "--no-progress")
    assert f"at epoch {st['epoch'] + 1}, batch {st['step']}" in r.stderr
    _assert_same_weights(ref, out)
    assert _log(ref) == _log(out)


# ------------------------------------------------------------------ worker side (run by torchrun)

def _equivalence_job(run_dir: str):
    from aerl_fast import distributed
    from aerl_fast import train as train_mod
    from aerl_fast.config import RunOptions, TrainConfig
    from aerl_fast.objectives import train_step
    from aerl_fast.optim import fused_adamw_supported

    dist = distributed.init()
    try:
        assert dist.world_size == 2, dist
        cfg = TrainConfig(dataset="shapes", model="alicnn", width=0.25, train_subset=256, batch_size=32,
                          objective="sl-adv").validate()
        tr = train_mod.Trainer(cfg, RunOptions(progress=False, out=run_dir), Path(run_dir), log=lambda m: None,
                               dist=dist)
        # exploration streams: per rank, and rank 0's is the single-process one
        states = dist.all_gather_object(tr.explore_gen.get_state())
        assert not torch.equal(states[0], states[1])
        assert torch.equal(states[0], torch.Generator().manual_seed(cfg.seed + 7919).get_state())

        # count the gradient all-reduces: the adversarial step must make one per step, not two
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        reduces = []

        def counting_hook(state, bucket):
            reduces.append(bucket.index())
            return allreduce_hook(state, bucket)
        tr.forward_model.register_comm_hook(None, counting_hook)

        ref = copy.deepcopy(tr.model)
        fused = {"fused": True} if fused_adamw_supported(tr.device) else {}
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        tr.forward_model.eval()
        ref.eval()
        worst_grad = worst_w = 0.0
        steps = 0
        for (x, y), (xg, yg) in zip(tr.loader.epoch(0), tr.loader.loader.epoch(0)):
            assert x.shape[0] == yg.shape[0] // 2
            assert torch.equal(y, yg[dist.rank * 16:(dist.rank + 1) * 16])
            tr.train_batch(x, y, adv_active=True)
            ref_opt.zero_grad(set_to_none=True)
            train_step(ref, xg, yg, tr.objective, adv_active=True)
            ref_opt.step()
            for p, q in zip(tr.model.parameters(), ref.parameters()):
                worst_grad = max(worst_grad, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item())
                worst_w = max(worst_w, (p - q).abs().max().item())
            assert dist.weight_spread(tr.model) == 0.0
            steps += 1
            if steps == 4:
                break
        assert steps == 4
        assert reduces.count(0) == steps, f"{reduces.count(0)} all-reduces of bucket 0 in {steps} steps"
        assert worst_grad < 1e-4, f"gradient differs from the global-batch gradient: {worst_grad}"
        assert worst_w < 1e-4 * cfg.lr * 100, f"weights differ from the single-process run: {worst_w}"

        # train mode: per-rank dropout masks, replicas still identical after every step
        tr.forward_model.train()
        losses = []
        for step, (x, y) in enumerate(tr.loader.epoch(1)):
            out = tr.train_batch(x, y, adv_active=True)
            losses.append(out.loss_clean.item())
            assert dist.weight_spread(tr.model) == 0.0, f"replicas differ after step {step}"
            if step == 3:
                break
        gathered = dist.all_gather_object(losses)
        assert gathered[0] != gathered[1]  # the ranks did see different data / dropout masks
        if dist.is_main:
            print(f"equivalence ok: {steps} steps, max relative gradient error {worst_grad:.2e}, "
                  f"max weight error {worst_w:.2e}", flush=True)
    finally:
        distributed.shutdown(dist)


def _main_first_job(root: str):
    import aerl_fast.data.imagefolder as imf
    from aerl_fast import distributed

    dist = distributed.init()
    try:
        decodes = []
        real = imf._decode_pil
        imf._decode_pil = lambda *a, **k: decodes.append(dist.rank) or real(*a, **k)
        ds = dist.main_first(lambda: imf.load_image_folder(root, "train", size=8, decoder="pil"))
        assert dist.all_gather_object(len(decodes)) == [1, 0], "rank 1 decoded instead of reading rank 0's cache"
        images = dist.all_gather_object(ds.images)
        assert images[0].shape == (6, 8, 8, 3) and (images[0] == images[1]).all()
        if dist.is_main:
            print("main_first ok", flush=True)
    finally:
        distributed.shutdown(dist)


if __name__ == "__main__":
    if sys.argv[1] == "equivalence":
        _equivalence_job(sys.argv[2])
    elif sys.argv[1] == "main_first":
        _main_first_job(sys.argv[2])
