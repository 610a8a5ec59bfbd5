"""Checkpoints: atomic writes made deterministic (a torch.save that writes half then raises, an
os.replace that raises), non-finite weights never written nor loaded, stale temporary files
removed, and every refusal a one-line CheckpointError naming the file, the key and the value."""
import math
import pickle

import pytest
import torch

import aerl_fast.checkpoint as ck
from aerl_fast.errors import CheckpointError
from aerl_fast.models import build_model

SPEC = dict(name="alicnn", width=0.25, num_classes=10, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], image_size=32)


def _state(seed=0, **spec):
    torch.manual_seed(seed)
    s = dict(SPEC, **spec)
    model = build_model(s["name"], s["num_classes"], width=s["width"], mean=s["mean"], std=s["std"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {"model_spec": s, "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "config": {"dataset": "shapes"}}, model


def _tmp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_gives_the_same_model(tmp_path):
    state, model = _state()
    ck.save_checkpoint(state, tmp_path / "best.pt")
    loaded = ck.load_model(tmp_path)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.aerl_spec == SPEC and loaded.aerl_config == {"dataset": "shapes"}
    assert _tmp_files(tmp_path) == []


def _nan_at(state, part, path, value=math.nan):
    node = state[part]
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = node[path[-1]].clone()
    node[path[-1]].view(-1)[-1] = value


@pytest.mark.parametrize("part, path, key", [
    ("model", ["1.classifier.4.weight"], "model.1.classifier.4.weight"),
    ("model", ["1.features.0.bias"], "model.1.features.0.bias"),
    ("optimizer", ["state", 2, "exp_avg_sq"], "optimizer.state.2.exp_avg_sq"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_never_written(tmp_path, part, path, key, value):
    good, _ = _state(1)
    ck.save_checkpoint(good, tmp_path / "last.pt")
    bad, _ = _state(2)
    _nan_at(bad, part, path, value)
    assert ck.first_non_finite(bad[part], part) == key
    with pytest.raises(CheckpointError, match=rf"not writing {tmp_path / 'last.pt'}: {key} holds NaN or inf"):
        ck.save_checkpoint(bad, tmp_path / "last.pt")
    torch.testing.assert_close(ck.load_checkpoint(tmp_path / "last.pt")["model"], good["model"])
    assert _tmp_files(tmp_path) == []


def test_first_non_finite_names_the_first_key_and_ignores_integers():
    state, _ = _state()
    assert ck.first_non_finite(state["model"]) is None and ck.first_non_finite(state["optimizer"]) is None
    tree = {"a": torch.ones(3), "b": [torch.tensor([1, 2]), {"c": torch.tensor([0.0, math.nan])}],
            "d": torch.tensor([math.inf])}
    assert ck.first_non_finite(tree) == "b.1.c"
    assert ck.first_non_finite([torch.ones(2), torch.tensor([math.nan])]) == "1"  # a list at the top
    assert ck.first_non_finite({"i": torch.tensor([2 ** 62]), "s": "nan"}) is None
    # large finite half-precision values whose fp16 sum would overflow are still finite
    assert ck.first_non_finite({"h": torch.full((100_000,), 60000.0, dtype=torch.float16),
                                "b": torch.full((10,), 3e38, dtype=torch.bfloat16)}) is None
    assert ck.first_non_finite({"h": torch.tensor([1.0, -math.inf], dtype=torch.float16)}) == "h"


def test_a_checkpoint_with_non_finite_weights_is_refused_on_loading(tmp_path):
    state, _ = _state()
    _nan_at(state, "model", ["1.classifier.1.bias"])
    torch.save({"format": ck.FORMAT, **state}, tmp_path / "old.pt")  # as written before the guard
    for load in (ck.load_checkpoint, ck.load_model):
        with pytest.raises(CheckpointError, match=r"old\.pt: model\.1\.classifier\.1\.bias holds NaN or inf"):
            load(tmp_path / "old.pt")


class _Boom(Exception):
    pass


def _half_writer(real_save):
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(f.tell() // 2 + 100)  # half the zip on disk, then the writer dies
        raise _Boom("killed mid-write")
    return save


@pytest.mark.parametrize("failure", ["torch.save writes half then raises", "os.replace raises",
                                     "KeyboardInterrupt inside torch.save"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch, failure):
    old, _ = _state(1)
    ck.save_checkpoint(old, tmp_path / "last.pt")
    new, _ = _state(2)
    if failure.startswith("torch.save"):
        monkeypatch.setattr(ck.torch, "save", _half_writer(torch.save))
        expected = _Boom
    elif failure.startswith("os.replace"):
        monkeypatch.setattr(ck.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
        expected = OSError
    else:
        monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        ck.save_checkpoint(new, tmp_path / "last.pt")
    monkeypatch.undo()
    torch.testing.assert_close(ck.load_checkpoint(tmp_path / "last.pt")["model"], old["model"])
    assert _tmp_files(tmp_path) == []
    ck.save_checkpoint(new, tmp_path / "last.pt")  # and the next write succeeds
    torch.testing.assert_close(ck.load_checkpoint(tmp_path / "last.pt")["model"], new["model"])


def test_a_half_written_temp_file_is_what_remove_stale_temp_files_removes(tmp_path, monkeypatch):
    """A kill (no exception handler runs) leaves the temp file: the helper removes it and only it."""
    state, _ = _state()
    ck.save_checkpoint(state, tmp_path / "last.pt")
    monkeypatch.setattr(ck.Path, "unlink", lambda *a, **k: None)  # as if SIGKILLed: no cleanup
    monkeypatch.setattr(ck.torch, "save", _half_writer(torch.save))
    with pytest.raises(_Boom):
        ck.save_checkpoint(state, tmp_path / "best.pt")
    monkeypatch.undo()
    (leftover,) = _tmp_files(tmp_path)
    assert leftover.startswith("best.pt.")
    keep = ["notes.tmp", "last.pt.tmp", "last.pt", "model.ptx.ab.tmp", "log.jsonl"]
    for name in keep[:2] + keep[3:]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "epoch_0002.pt.k9_z.tmp").mkdir()  # a folder of that name is not ours to delete
    removed = ck.remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["epoch_0002.pt.k9_z.tmp"])
    assert ck.remove_stale_temp_files(tmp_path / "no_such_run") == []


def test_a_weight_mismatch_names_the_key_and_both_shapes(tmp_path):
    state, _ = _state()
    state["model"]["1.classifier.4.weight"] = torch.zeros(58, 256)  # a 58-class head on a 10-class spec
    ck.save_checkpoint(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape\.pt: weight 1\.classifier\.4\.weight has shape \[58, 256\] "
                                              r"in the checkpoint but \[10, 256\] in the model"):
        ck.load_model(tmp_path / "shape.pt")
    state, _ = _state()
    state["model"]["extra.weight"] = state["model"].pop("1.features.0.weight")
    ck.save_checkpoint(state, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"keys\.pt: weights do not fit the model \(missing 1\.features\.0\.weight; "
                                              r"unexpected extra\.weight\)$"):
        ck.load_model(tmp_path / "keys.pt")


@pytest.mark.parametrize("drop, add, reason", [
    (["1.features.0.bias"], [], "missing 1.features.0.bias"),
    ([], ["x.a"], "unexpected x.a"),
    (["0.mean", "0.std", "1.features.0.weight"], [], "missing 0.mean, 0.std, 1.features.0.weight"),
    ([], ["x.a", "x.b", "x.c"], "unexpected x.a, x.b, x.c"),
    (["0.mean", "0.std", "1.features.0.weight", "1.features.0.bias"], ["x.a", "x.b", "x.c", "x.d"],
     "missing 0.mean, 0.std, 1.features.0.weight ...; unexpected x.a, x.b, x.c ..."),
])
def test_missing_and_unexpected_keys_are_listed_up_to_three(tmp_path, drop, add, reason):
    state, _ = _state()
    for k in drop:
        del state["model"][k]
    for k in add:
        state["model"][k] = torch.zeros(1)
    ck.save_checkpoint(state, tmp_path / "k.pt")
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path / "k.pt")
    assert str(e.value) == f"{tmp_path / 'k.pt'}: weights do not fit the model ({reason})"


@pytest.mark.parametrize("change, match", [
    ({"num_classes": "10"}, r"num_classes must be an integer, got '10'"),
    ({"num_classes": 1}, r"num_classes must be in \[2, 100000\], got 1"),
    ({"num_classes": True}, r"num_classes must be in \[2, 100000\], got True"),
    ({"width": math.nan}, r"width must be > 0 and <= 64, got nan"),
    ({"width": -0.5}, r"width must be > 0 and <= 64, got -0.5"),
    ({"image_size": 4}, r"image_size must be in \[8, 4096\], got 4"),
    ({"mean": [0.5, 0.5]}, r"mean must be 3 finite numbers"),
    ({"std": [0.5, 0.0, 0.5]}, r"std must be positive"),
    ({"name": "vgg"}, r"unknown model 'vgg'"),
    ({"name": "resnet50", "width": 0.5}, r"resnet50 has no width multiplier"),
])
def test_a_bad_model_spec_is_named(tmp_path, change, match):
    ck.save_checkpoint({"model_spec": dict(SPEC, **change), "model": {}}, tmp_path / "spec.pt")
    with pytest.raises(CheckpointError, match=r"spec\.pt: model_spec: " + match):
        ck.load_model(tmp_path / "spec.pt")


@pytest.mark.parametrize("state, match", [
    ({"model_spec": [1, 2], "model": {}}, r"model_spec is list, not a dict"),
    ({"model_spec": {k: v for k, v in SPEC.items() if k not in ("width", "std")}, "model": {}},
     r"model_spec lacks width, std$"),
    ({"model_spec": SPEC, "model": {"w": 3}}, r"'model' is not a dict of tensors"),
    ({"model_spec": SPEC, "model": {}, "config": [1]}, r"'config' is list, not a dict"),
])
def test_a_malformed_checkpoint_is_named(tmp_path, state, match):
    torch.save({"format": ck.FORMAT, **state}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m\.pt: " + match):
        ck.load_checkpoint(tmp_path / "m.pt")


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    ok, _ = _state()
    ck.save_checkpoint(ok, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for name, reason in (("empty.pt", "not a readable aerl_fast checkpoint (an empty file)"),
                         ("text.pt", "not a readable aerl_fast checkpoint (it starts with b'hell', not a zip archive)"),
                         ("cut.pt", "not a readable aerl_fast checkpoint (PytorchStreamReader failed reading zip "
                                    "archive: failed finding central directory.")):
        with pytest.raises(CheckpointError) as e:
            ck.load_checkpoint(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {reason}")
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("content, match", [
    ({"state_dict": {"w": torch.zeros(2)}}, r"not an aerl_fast checkpoint \(format None\)$"),
    ({"format": "other/2"}, r"not an aerl_fast checkpoint \(format other/2\)$"),
    ([torch.zeros(2)], r"not an aerl_fast checkpoint \(format list\)$"),
])
def test_a_foreign_checkpoint_is_named(tmp_path, content, match):
    torch.save(content, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'f.pt'}: " + match):
        ck.load_checkpoint(tmp_path / "f.pt")


def test_a_run_folder_resolves_to_best_then_last(tmp_path):
    state, _ = _state()
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope'}: no such checkpoint file or run folder$"):
        ck.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: no best.pt or last.pt in this run folder$"):
        ck.resolve_checkpoint(tmp_path)
    ck.save_checkpoint(state, tmp_path / "last.pt")
    assert ck.resolve_checkpoint(tmp_path) == tmp_path / "last.pt"
    ck.save_checkpoint(state, tmp_path / "best.pt")
    assert ck.resolve_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert ck.resolve_checkpoint(tmp_path / "last.pt") == tmp_path / "last.pt"


def test_save_creates_missing_folders_and_load_honours_map_location(tmp_path):
    state, _ = _state()
    ck.save_checkpoint(state, tmp_path / "a" / "b" / "last.pt")
    meta = ck.load_checkpoint(tmp_path / "a" / "b" / "last.pt", map_location="meta")
    assert all(t.device.type == "meta" for t in meta["model"].values())


def test_the_meta_build_allocates_nothing_and_a_bad_spec_is_named_without_a_file():
    model = ck.build_from_spec(dict(SPEC, name="cnn6", width=64), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 10 ** 10  # ~60 GB had it been real
    with pytest.raises(CheckpointError, match=r"^model_spec: num_classes must be in \[2, 100000\], got 0$"):
        ck.build_from_spec(dict(SPEC, num_classes=0))


def test_a_spec_whose_model_would_not_fit_in_memory_is_compared_on_the_meta_device(tmp_path):
    ck.save_checkpoint({"model_spec": dict(SPEC, name="cnn6", width=64), "model": {}}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"big\.pt: weights do not fit the model \(missing 0\.mean, 0\.std, "
                                              r"1\.features\.1\.weight \.\.\.\)$"):
        ck.load_model(tmp_path / "big.pt")


def test_a_checkpoint_without_config_loads_with_an_empty_one(tmp_path):
    state, _ = _state()
    del state["config"]
    ck.save_checkpoint(state, tmp_path / "c.pt")
    assert ck.load_model(tmp_path / "c.pt").aerl_config == {}


def test_a_legacy_torch_pickle_checkpoint_still_loads(tmp_path):
    state, model = _state()
    torch.save({"format": ck.FORMAT, **state}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ck.load_model(tmp_path / "legacy.pt")(x), model.eval()(x), rtol=0, atol=0)


def test_torch_advice_alone_is_never_relayed():
    """Should torch's refusal ever hold nothing but its advice, the reason falls back to the error type."""
    advice = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                    "`False` will likely succeed.\nDo it only if you got the file from a trusted source.")
    assert ck._load_error(advice) == "UnpicklingError"
