"""aerl_fast.attacks.transfer on a deliberately asymmetric pair: a model that always answers class 0
beside one that reads the label off the image, attacked by a scripted "attack" that changes known
images.  Every entry of the matrix is then known per sample, so a transposed matrix, entries masked
with the wrong model's clean set, or a batch written to the wrong rows fails."""
import pytest
import torch
import torch.nn as nn

from aerl_fast.attacks import TransferError, transfer_matrix
from aerl_fast.attacks.transfer import check_same_classes, num_classes

CLASSES, N = 5, 11


class Constant(nn.Module):
    """Always class 0 (right on the label-0 images only); no image can move it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        z = torch.zeros(x.shape[0], CLASSES) + 0 * self.w
        z[:, 0] = 1.0
        return z


class Reader(nn.Module):
    """Predicts round(5·pixel[0])): right wherever that pixel holds the label."""

    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.arange(CLASSES).float() / CLASSES, requires_grad=False)

    def forward(self, x):
        return -((x[:, :1, 0, 0] - self.centres[None]) ** 2)


def _images():
    """Pixel [0] encodes the label (wrong on purpose for image 2), pixel [1] the image's index."""
    y = torch.arange(N) % CLASSES                       # label 0 at images 0, 5, 10
    x = torch.full((N, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = y.float() / CLASSES
    x[2, 0, 0, 0] = 4 / CLASSES                         # the reader misreads image 2 (label 2)
    x[:, 0, 0, 1] = torch.arange(N).float() / 100
    return x, y


# which images each scripted attack changes, by the model it was handed
MOVED = {"const": {1, 3, 5, 8}, "reader": {0, 4, 6, 7, 9}}


def scripted(models, calls):
    """attack(model, xb, yb): shifts pixel [0] of the images listed for that model (found by the index
    pixel, so batching does not matter) to the next class."""
    who = {id(m): name for name, m in models.items()}

    def attack(model, xb, yb):
        name = who[id(model)]
        calls.append((name, xb.shape[0]))
        idx = torch.round(xb[:, 0, 0, 1] * 100).long().tolist()
        out = xb.clone()
        for r, i in enumerate(idx):
            if i in MOVED[name]:
                out[r, 0, 0, 0] = ((yb[r] + 1) % CLASSES).float() / CLASSES
        return out
    return attack


def expected(x, y, models):
    """Per sample: target correct on the clean image and on the image crafted on the source."""
    with torch.no_grad():
        ok = {n: m(x).argmax(1) == y for n, m in models.items()}
    names = list(models)
    robust = torch.zeros(len(names), len(names), N, dtype=torch.bool)
    for a, src in enumerate(names):
        adv = x.clone()
        for i in MOVED[src]:
            adv[i, 0, 0, 0] = ((y[i] + 1) % CLASSES).float() / CLASSES
        for b, tgt in enumerate(names):
            with torch.no_grad():
                robust[a, b] = ok[tgt] & (models[tgt](adv).argmax(1) == y)
    return robust, torch.stack([ok[n] for n in names]).double().mean(1)


@pytest.mark.parametrize("batch_size", [N, 4, 1])
def test_every_entry_against_the_per_sample_definition(batch_size):
    x, y = _images()
    models = {"const": Constant(), "reader": Reader()}
    calls = []
    res = transfer_matrix(models, x, y, scripted(models, calls), batch_size=batch_size)
    robust, clean = expected(x, y, models)
    assert res.names == ["const", "reader"]
    assert torch.equal(res.robust, robust)
    assert res.clean.tolist() == pytest.approx(clean.tolist())
    # the numbers, by hand: const is right on images 0, 5, 10 and nothing moves it; the reader is
    # right on all but image 2 and wrong on every image moved
    assert res.clean.tolist() == pytest.approx([3 / N, 10 / N])
    assert (res.accuracy * N).round().tolist() == [[3, 6],     # crafted on const: 1, 3, 5, 8 moved
                                                   [3, 5]]     # crafted on reader: 0, 4, 6, 7, 9 moved
    assert res.accuracy.tolist() == robust.double().mean(2).tolist()
    assert sorted(calls) == sorted((name, min(batch_size, N - i)) for name in models for i in range(0, N, batch_size))


def test_reused_adversarials_are_not_crafted_again_and_progress_counts_crafted_images():
    x, y = _images()
    models = {"const": Constant(), "reader": Reader()}
    robust, _ = expected(x, y, models)
    calls, seen = [], []
    given = x.clone()
    for i in MOVED["reader"]:
        given[i, 0, 0, 0] = ((y[i] + 1) % CLASSES).float() / CLASSES
    res = transfer_matrix(models, x, y, scripted(models, calls), batch_size=4, adversarials={"reader": given},
                          progress=seen.append)
    assert {name for name, _ in calls} == {"const"}
    assert seen == [4, 4, 3]
    assert torch.equal(res.robust, robust)


def test_models_are_evaluated_in_eval_mode():
    x, y = _images()
    reader = Reader().train()
    res = transfer_matrix({"reader": reader}, x, y, lambda m, xb, yb: xb)
    assert not reader.training and res.accuracy.tolist() == [[10 / N]]


def test_class_counts_come_from_the_spec_or_one_probe():
    probe = torch.rand(3, 1, 2, 2)
    reader = Reader().train()
    assert num_classes(reader, probe) == CLASSES and reader.training     # probed in eval mode, mode restored
    reader.aerl_spec = {"num_classes": 7}
    assert num_classes(reader) == 7
    with pytest.raises(TransferError, match="without a probe input"):
        num_classes(Reader())
    assert check_same_classes({"a": Reader(), "b": Constant()}, probe) == CLASSES
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(TransferError, match=r"class counts differ \(a: 5, b: 3\)"):
        check_same_classes({"a": Reader(), "b": other}, probe)


def test_no_models_is_an_error():
    x, y = _images()
    with pytest.raises(TransferError, match="no models given"):
        transfer_matrix({}, x, y, lambda m, xb, yb: xb)


def test_per_sample_outcomes_are_booleans_and_errors_say_what_is_missing():
    x, y = _images()
    models = {"const": Constant(), "reader": Reader()}
    res = transfer_matrix(models, x, y, scripted(models, []), batch_size=4)
    assert res.robust.dtype == torch.bool and res.robust.shape == (2, 2, N)
    with pytest.raises(TransferError, match="^cannot tell the model's class count without a probe input$"):
        num_classes(Reader())
    with pytest.raises(TransferError, match="^transfer matrix: no models given$"):
        transfer_matrix({}, x, y, scripted(models, []))
