"""Every registered model: forward, backward, parameter counts, options."""

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import MODELS, count_parameters, create_model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [32, 96])
def test_every_model_trains_a_step(name, size):
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, input_size=size)
    x = torch.randn(4, 3, size, size)
    logits = net(x)
    assert logits.shape == (4, 7)
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("net", {}, 18_354),
        ("resnet10", {}, 159_594),
        # net2: conv 3->16, 16->8, 8->8, fc 128->32, fc 32->10
        ("net2", {}, 448 + 1160 + 584 + 4128 + 330),
        # LeNet-5 at 32x32: 456 + 2416 + 48120 + 10164 + 850
        ("lenet5", {}, 62_006),
        # the reference's width-32 variants: conv 3->32, 32->16, fc 1024->32, fc 32->10
        ("net", {"width": 32, "dropout": 0.3}, 896 + 4624 + 32_800 + 330),
        ("net", {"width": 32, "batch_norm": True}, 896 + 64 + 4624 + 32 + 32_800 + 330),
        ("mlp", {}, 3072 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 128 + 128 + 1290),
    ],
)
def test_parameter_counts_match_the_reference(name, options, expected):
    assert count_parameters(create_model(name, **options)) == expected


@pytest.mark.parametrize("name", ["speedrun", "resnet9"])
def test_globally_pooled_models_have_one_size_whatever_the_input(name):
    # Their width is the network's, never the image's (a shadowed `width` once built
    # speedrun at width 32 for 32-px images: 0.5 M parameters instead of airbench's 1.97 M).
    counts = {count_parameters(create_model(name, input_size=s)) for s in (32, 96, (32, 48))}
    assert len(counts) == 1
    if name == "speedrun":
        assert counts == {1_972_504}


@pytest.mark.parametrize("options", [{}, {"batch_norm": True}, {"width": 32, "dropout": 0.3}])
def test_pooling_before_tanh_is_the_reference_order_function(options):
    """net pools before its tanh (4x less tanh work): the reference's conv-tanh-pool gives
    the same outputs and gradients from the same weights."""
    torch.manual_seed(0)
    net = create_model("net", **options).eval()
    swapped = [
        (i, i + 1)
        for i, (a, b) in enumerate(zip(net, list(net)[1:], strict=False))
        if isinstance(a, torch.nn.MaxPool2d) and isinstance(b, torch.nn.Tanh)
    ]
    assert len(swapped) == 2
    layers = list(net)
    for i, j in swapped:
        layers[i], layers[j] = layers[j], layers[i]
    reference = torch.nn.Sequential(*layers).eval()  # the same modules, the seed's order
    x = torch.randn(8, 3, 32, 32)
    ours, theirs = net(x), reference(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    grads = [torch.autograd.grad(out.sum(), list(net.parameters())) for out in (ours, theirs)]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_reference_variants_have_the_layers_the_tables_name():
    dropout_net = create_model("net", width=32, dropout=0.3)
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in dropout_net.modules()) == 2
    bn_lenet = create_model("lenet5", batch_norm=True)
    # BatchNorm after every relu: conv1, conv2, fc1, fc2
    assert (
        sum(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in bn_lenet.modules())
        == 4
    )
    resnet = create_model("resnet10")
    bns = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 10 and all(torch.all(b.weight == 0.5) for b in bns)


def test_options_flow_to_every_model_that_supports_them():
    for name, entry in MODELS.items():
        if "dropout" in entry.options:
            net = create_model(name, dropout=0.5)
            assert any(
                isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d) for m in net.modules()
            ), name
        if "batch_norm" in entry.options:
            plain = count_parameters(create_model(name))
            assert count_parameters(create_model(name, batch_norm=True)) > plain, name


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ToolkitError, match="resnet10"):
        create_model("resnet50")


def test_unsupported_option_is_a_clear_error():
    with pytest.raises(ToolkitError, match="does not support --width"):
        create_model("lenet5", width=32)
    with pytest.raises(ToolkitError, match="between 0 and 1"):
        create_model("net", dropout=1.5)


def test_input_too_small_is_a_clear_error():
    with pytest.raises(ToolkitError, match="too small"):
        create_model("lenet5", input_size=8)
