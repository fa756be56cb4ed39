"""The model registry: every model builds, outputs logits, and has stable variable paths."""
import keras
import numpy as np
import pytest

from lottery.models import MODELS, build_model, output_kernel_path, prunable_weights

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def models():
    """Every registered model, built once for the module."""
    return {name: build_model(name, SHAPE, 10, seed=0) for name in MODELS}


def test_registry_names():
    assert list(MODELS) == [
        "lenet_300_100", "conv2", "conv4", "conv6", "resnet20", "vgg16", "resnet50", "mobilenetv2",
    ]
    with pytest.raises(ValueError, match="lenet_300_100.*mobilenetv2"):
        build_model("resnet18", SHAPE, 10, seed=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_builds_with_stable_paths_and_logits(models, name):
    model = models[name]
    assert model.output_shape == (None, 10)
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense)
    assert last.activation is keras.activations.linear  # logits
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    paths = [v.path for v in model.weights]
    assert len(set(paths)) == len(paths)
    # Built again in the same process (Keras' auto-numbering would now say dense_7 ...).
    again = build_model(name, SHAPE, 10, seed=1)
    assert [v.path for v in again.weights] == paths
    assert list(prunable_weights(again)) == list(prunable_weights(model))
    assert output_kernel_path(model) == output_kernel_path(again)
    assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]
    if name not in ("resnet50", "mobilenetv2"):
        logits = model(np.zeros((2, *SHAPE), np.float32), training=False)
        assert tuple(logits.shape) == (2, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_prunable_weights_are_conv_and_dense_kernels_only(models, name):
    model = models[name]
    prunable = prunable_weights(model)
    assert prunable and all(path.endswith("kernel") for path in prunable)
    owner = {id(v): layer for layer in model.layers for v in layer.weights}
    for variable in model.weights:
        layer = owner[id(variable)]
        is_kernel = variable.name == "kernel" and isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
        )
        assert (variable.path in prunable) == is_kernel, variable.path
        if isinstance(layer, keras.layers.BatchNormalization) or variable.name == "bias":
            assert variable.path not in prunable
    assert output_kernel_path(model) == list(prunable)[-1]
    assert output_kernel_path(model) in (
        "output/kernel", "predictions/kernel",
    )


def test_batchnorm_and_depthwise(models):
    resnet20 = prunable_weights(models["resnet20"])
    assert len(resnet20) == 19 + 2 + 1  # 19 3x3 convs, 2 projection shortcuts, the classifier
    assert "stage2_block1_shortcut_conv/kernel" in resnet20
    assert not any("bn" in path for path in resnet20)
    mobilenet = models["mobilenetv2"]
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in mobilenet.layers)
    depthwise = [l for l in mobilenet.layers if isinstance(l, keras.layers.DepthwiseConv2D)]
    assert depthwise and all(l.kernel.path in prunable_weights(mobilenet) for l in depthwise)


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        # Frankle & Carbin (2019), Fig. 2; Frankle et al. (2019); He et al. (2016).
        ("lenet_300_100", (28, 28, 1), 266_610),
        ("conv2", (32, 32, 3), 4.3e6),
        ("conv4", (32, 32, 3), 2.4e6),
        ("resnet20", (32, 32, 3), 0.27e6),
        ("vgg16", (32, 32, 3), 14.7e6),
    ],
)
def test_parameter_counts_match_the_papers(models, name, shape, expected):
    model = models[name] if shape == SHAPE else build_model(name, shape, 10, seed=0)
    count = sum(int(np.prod(v.shape)) for v in prunable_weights(model).values())
    assert count == pytest.approx(expected, rel=0.02)


def test_same_seed_same_weights():
    first = build_model("lenet_300_100", (28, 28, 1), 10, seed=7)
    second = build_model("lenet_300_100", (28, 28, 1), 10, seed=7)
    other = build_model("lenet_300_100", (28, 28, 1), 10, seed=8)
    for a, b, c in zip(first.weights, second.weights, other.weights):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
        if a.name == "kernel":
            assert not np.array_equal(a.numpy(), c.numpy()), a.path
    # Kernels differ from layer to layer and have the paper's scale (Gaussian Glorot).
    fc1 = first.get_layer("fc1").kernel.numpy()
    assert fc1.std() == pytest.approx(np.sqrt(2 / (784 + 300)), rel=0.05)


def test_same_seed_same_weights_resnet20():
    first = build_model("resnet20", (16, 16, 3), 5, seed=3)
    second = build_model("resnet20", (16, 16, 3), 5, seed=3)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first.weights, second.weights))
    stem = first.get_layer("stem_conv").kernel.numpy()
    assert stem.std() == pytest.approx(np.sqrt(2 / 27), rel=0.15)  # He normal, fan-in 3*3*3


def test_any_input_shape_and_class_count():
    model = build_model("conv6", (28, 28, 1), 3, seed=0)
    assert model.output_shape == (None, 3)
    model = build_model("vgg16", (28, 28, 1), 3, seed=0)
    assert model.output_shape == (None, 3)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2"])
def test_applications_refuse_small_inputs_clearly(name):
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model(name, (28, 28, 1), 10, seed=0)
