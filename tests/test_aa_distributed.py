"""autoattack_fast_sharded under `torchrun --nproc_per_node=2` (gloo, CPU): the gathered result
equals the single-process result sample by sample.  This file is also the worker script (the
`__main__` block at the bottom), launched as tests/test_distributed.py launches its workers.
"""
import json
import sys

import pytest
import torch

from eval_fixtures import TRAIN_N, tiny_runs  # noqa: F401 - fixture
from test_distributed import torchrun

N = 37   # odd: the two shards differ in size
SETTINGS = dict(eps=0.4, norm="l2", seed=5, steps=8, queries=40)


@pytest.mark.slow
def test_two_processes_equal_one_sample_by_sample(tiny_runs, tmp_path):  # noqa: F811
    out = tmp_path / "gathered.pt"
    r = torchrun(__file__, str(tiny_runs.dirs["rl"]), str(out))
    assert "sharded ok" in r.stdout, r.stdout[-2000:]
    got = torch.load(out, weights_only=True)
    single = _single(tiny_runs.dirs["rl"])
    for name in ("robust", "clean", "broken_by", "forwards", "backwards"):
        assert torch.equal(got[name], getattr(single, name)), name
    assert single.stages[0].broken > 0 and single.robust.any()
    stages = json.loads(got["stages"])
    for mine, ref in zip(stages, single.stages):
        for field in ("attacked", "broken", "forwards", "backwards", "disagreements"):
            assert mine[field] == getattr(ref, field), (ref.name, field)
    assert got["processes"] == 2


def _data():
    from eval_fixtures import shapes_test
    x, y = shapes_test()
    return x[TRAIN_N:TRAIN_N + N].contiguous(), y[TRAIN_N:TRAIN_N + N].contiguous()


def _single(run_dir):
    import aerl_fast
    from aerl_fast.attacks import autoattack_fast
    x, y = _data()
    return autoattack_fast(aerl_fast.load_model(run_dir), x, y, batch_size=16, **SETTINGS)


def _worker(run_dir: str, out: str):
    import aerl_fast
    from aerl_fast import distributed
    from aerl_fast.attacks import autoattack_fast_sharded

    torch.set_num_threads(1)
    ctx = distributed.init()
    try:
        assert ctx.world_size == 2, ctx
        x, y = _data()
        res = autoattack_fast_sharded(aerl_fast.load_model(run_dir), x, y, dist=ctx, batch_size=7, **SETTINGS)
        if ctx.is_main:
            torch.save({"robust": res.robust, "clean": res.clean, "broken_by": res.broken_by,
                        "forwards": res.forwards, "backwards": res.backwards,
                        "stages": json.dumps([vars(s) for s in res.stages]),
                        "processes": res.settings["processes"]}, out)
            print("sharded ok", flush=True)
        else:
            assert res is None
    finally:
        distributed.shutdown(ctx)


if __name__ == "__main__":  # torchrun runs this file: tests/ is its sys.path[0]
    _worker(sys.argv[1], sys.argv[2])
