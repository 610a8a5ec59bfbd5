"""Model shapes, parameter counts and the in-model normalisation."""
import pytest
import torch

from aerl_fast.models import MODELS, ModelError, build_model


def _cnn6_params(num_classes, c=(264, 128, 512, 128, 128, 128), hidden=256, k=4):
    """Parameter count of the study's 6-layer CNN from its layer list (conv + BN, fc1 + BN, fc2)."""
    total, cin = 0, 3
    for cout in c:
        total += cin * cout * k * k + cout + 2 * cout  # conv weight+bias, BN affine
        cin = cout
    total += c[-1] * 4 * 4 * hidden + hidden + 2 * hidden
    total += hidden * num_classes + num_classes
    return total


def test_cnn6_exact_shapes_and_parameter_count():
    m = build_model("cnn6", 10)
    assert sum(p.numel() for p in m.parameters()) == _cnn6_params(10) == 3706274
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 264, (4, 4)), (264, 128, (4, 4)), (128, 512, (4, 4)), (512, 128, (4, 4)),
        (128, 128, (4, 4)), (128, 128, (4, 4))]
    fcs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(2048, 256), (256, 10)]
    drops = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert drops == [0.2, 0.25, 0.35, 0.5]
    # 'same' padding keeps 32x32 through each conv pair; three pools give 4x4
    feats = m[1].features(torch.rand(2, 3, 32, 32))
    assert feats.shape == (2, 128, 4, 4)
    assert sum(p.numel() for p in build_model("cnn6", 100).parameters()) == _cnn6_params(100)


def test_cnn6_width_multiplier():
    m = build_model("cnn6", 10, width=0.25)
    expected = _cnn6_params(10, c=(66, 32, 128, 32, 32, 32), hidden=64)
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize("name, width, size", [
    ("cnn6", 0.125, 32), ("alicnn", 0.5, 32), ("alicnn", 1.0, 32), ("resnet18", 0.125, 32),
    ("resnet50", 1.0, 32), ("densenet121", 1.0, 32)])
def test_forward_shapes(name, width, size):
    m = build_model(name, 7, width=width).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_normalisation_is_inside_the_model():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    m = build_model("alicnn", 10, width=0.25, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), m[1](manual))
    assert {"0.mean", "0.std"} <= set(m.state_dict())  # saved with the weights


def test_registry_errors():
    assert set(MODELS) >= {"cnn6", "alicnn", "resnet18", "resnet50", "densenet121"}
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        build_model("vgg", 10)
    with pytest.raises(ModelError, match="width"):
        build_model("cnn6", 10, width=0)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet50", 10, width=0.5)
