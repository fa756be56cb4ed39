"""Model registry for lottery-ticket experiments (Keras 3 only, any backend).

Every builder returns a functional `keras.Model` that outputs logits. Every
layer has an explicit name, so `variable.path` is identical each time a model
is built: masks and rewind checkpoints are keyed by these paths.

* `lenet_300_100`, `conv2`, `conv4`, `conv6`: Frankle & Carbin (2019), Fig. 2,
  Gaussian Glorot initialisation.
* `resnet20`, `vgg16`: OpenLTH's CIFAR networks, kaiming normal (fan-in),
  BatchNorm with PyTorch's momentum and epsilon.
* `resnet50`, `mobilenetv2`: `keras.applications`, `weights=None`, logits.

No model has dropout: training must be exactly reproducible.
"""

import keras
from keras import layers

# Untruncated normals, as `torch.nn.init.xavier_normal_` / `kaiming_normal_`.
# Keras' "glorot_normal" and "he_normal" are truncated normals.
GLOROT_NORMAL = dict(scale=1.0, mode="fan_avg", distribution="untruncated_normal")
HE_NORMAL = dict(scale=2.0, mode="fan_in", distribution="untruncated_normal")

# PyTorch BatchNorm defaults (momentum 0.1 there is 0.9 here), as in OpenLTH.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# keras.applications refuses smaller inputs.
APPLICATIONS_MIN_SIZE = 32

PRUNABLE_LAYER_TYPES = (
    layers.Dense,
    layers.Conv1D,
    layers.Conv2D,
    layers.Conv3D,
    layers.Conv1DTranspose,
    layers.Conv2DTranspose,
    layers.Conv3DTranspose,
    layers.DepthwiseConv1D,
    layers.DepthwiseConv2D,
    layers.SeparableConv1D,
    layers.SeparableConv2D,
)
KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def _init(spec):
    # A fresh initializer per layer: a shared seeded instance would give
    # every layer the same values.
    return keras.initializers.VarianceScaling(**spec)


def _dense(units, name, init, activation=None):
    return layers.Dense(
        units,
        activation=activation,
        kernel_initializer=_init(init),
        bias_initializer="zeros",
        name=name,
    )


def _conv(filters, name, init, *, kernel_size=3, strides=1, use_bias=True, activation=None):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        activation=activation,
        kernel_initializer=_init(init),
        name=name,
    )


def _bn(name):
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


# --- Frankle & Carbin (2019) -------------------------------------------------


def lenet_300_100(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Flatten(name="flatten")(inputs)
    x = _dense(300, "fc1", GLOROT_NORMAL, activation="relu")(x)
    x = _dense(100, "fc2", GLOROT_NORMAL, activation="relu")(x)
    outputs = _dense(num_classes, "output", GLOROT_NORMAL)(x)
    return keras.Model(inputs, outputs, name="lenet_300_100")


def _conv_net(name, stages, input_shape, num_classes):
    """Conv-2/4/6: `stages` blocks of two 3x3 convs and a 2x2 max pool,
    then dense 256, 256 and the output layer."""
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for stage, filters in enumerate(stages, start=1):
        x = _conv(filters, f"conv{stage}_1", GLOROT_NORMAL, activation="relu")(x)
        x = _conv(filters, f"conv{stage}_2", GLOROT_NORMAL, activation="relu")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = _dense(256, "fc1", GLOROT_NORMAL, activation="relu")(x)
    x = _dense(256, "fc2", GLOROT_NORMAL, activation="relu")(x)
    outputs = _dense(num_classes, "output", GLOROT_NORMAL)(x)
    return keras.Model(inputs, outputs, name=name)


def conv2(input_shape, num_classes):
    return _conv_net("conv2", [64], input_shape, num_classes)


def conv4(input_shape, num_classes):
    return _conv_net("conv4", [64, 128], input_shape, num_classes)


def conv6(input_shape, num_classes):
    return _conv_net("conv6", [64, 128, 256], input_shape, num_classes)


# --- CIFAR ResNet-20 (He et al. 2016) and VGG-16 (Frankle et al. 2019) -------


def _basic_block(x, filters, strides, name):
    shortcut = x
    y = _conv(filters, f"{name}_conv1", HE_NORMAL, strides=strides, use_bias=False)(x)
    y = _bn(f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, f"{name}_conv2", HE_NORMAL, use_bias=False)(y)
    y = _bn(f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(
            filters, f"{name}_shortcut_conv", HE_NORMAL,
            kernel_size=1, strides=strides, use_bias=False,
        )(x)
        shortcut = _bn(f"{name}_shortcut_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu2")(y)


def resnet20(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv(16, "stem_conv", HE_NORMAL, use_bias=False)(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate([16, 32, 64], start=1):
        for block in range(1, 4):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, strides, name=f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _dense(num_classes, "output", HE_NORMAL)(x)
    return keras.Model(inputs, outputs, name="resnet20")


VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def vgg16(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    conv_index = pool_index = 0
    for entry in VGG16_PLAN:
        if entry == "M":
            pool_index += 1
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{pool_index}")(x)
        else:
            conv_index += 1
            x = _conv(entry, f"conv{conv_index}", HE_NORMAL, use_bias=False)(x)
            x = _bn(f"bn{conv_index}")(x)
            x = layers.ReLU(name=f"relu{conv_index}")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _dense(num_classes, "output", HE_NORMAL)(x)
    return keras.Model(inputs, outputs, name="vgg16")


# --- keras.applications ------------------------------------------------------


def _check_min_size(name, input_shape):
    height, width = input_shape[0], input_shape[1]
    if height < APPLICATIONS_MIN_SIZE or width < APPLICATIONS_MIN_SIZE:
        raise ValueError(
            f"{name} needs inputs of at least {APPLICATIONS_MIN_SIZE}x{APPLICATIONS_MIN_SIZE} "
            f"pixels; got input_shape={tuple(input_shape)}. Resize the dataset "
            f"(preprocessing) or choose a smaller model (lenet_300_100, conv2/4/6, resnet20, vgg16)."
        )


def resnet50(input_shape, num_classes):
    _check_min_size("resnet50", input_shape)
    return keras.applications.ResNet50(
        weights=None, include_top=True, input_shape=tuple(input_shape),
        input_tensor=keras.Input(shape=input_shape, name="input"),
        classes=num_classes, classifier_activation=None,
    )


def mobilenetv2(input_shape, num_classes):
    _check_min_size("mobilenetv2", input_shape)
    # include_top=True leaves the pooling layer unnamed (auto-numbered), so
    # the same top (pooling, Dense "predictions") is added here with names.
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=tuple(input_shape),
        input_tensor=keras.Input(shape=input_shape, name="input"),
    )
    x = layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    outputs = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(base.input, outputs, name="mobilenetv2")


MODELS = {
    "lenet_300_100": lenet_300_100,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
}


def build_model(name, input_shape, num_classes, *, seed):
    """Builds registry model `name` for `input_shape` (H, W, C) and
    `num_classes` classes, initialised deterministically from `seed`."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODELS)}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels); got {input_shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}")
    set_random_seed(int(seed))
    return MODELS[name](input_shape, int(num_classes))


def set_random_seed(seed: int) -> None:
    keras_without_tensorflow()
    keras.utils.set_random_seed(seed)


def keras_without_tensorflow() -> None:
    """On JAX, keep Keras from importing TensorFlow merely because it is installed: Keras 3.15
    does in `set_random_seed` and `model.save` (3 to 12 s in every JAX task process, for nothing a
    JAX run uses). A process that imported TensorFlow already is left as it is."""
    import sys

    if keras.backend.backend() != "jax" or "tensorflow" in sys.modules:
        return
    from keras.src.utils import module_utils

    if module_utils.tensorflow.module is None:
        module_utils.tensorflow._available = False


# --- prunable weights --------------------------------------------------------


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):  # a nested model
            yield from _all_layers(layer)


def prunable_weights(model):
    """Conv (incl. depthwise and separable) and Dense kernels, keyed by
    `variable.path`, in layer order. Never biases, never BatchNorm variables."""
    weights = {}
    seen = set()
    for layer in _all_layers(model):
        if not isinstance(layer, PRUNABLE_LAYER_TYPES) or id(layer) in seen:
            continue
        seen.add(id(layer))
        for variable in layer.weights:
            if variable.name not in KERNEL_NAMES:
                continue
            if variable.path in weights:
                raise ValueError(f"Two prunable weights share the path {variable.path!r}")
            weights[variable.path] = variable
    return weights


def batchnorm_layers(model):
    """The model's BatchNormalization layers (nested models included), in layer order."""
    found = []
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization) and all(layer is not f for f in found):
            found.append(layer)
    return found


def output_kernel_path(model):
    """The path of the last Dense layer's kernel (the classifier)."""
    dense_kernels = [
        variable.path
        for layer in _all_layers(model)
        if isinstance(layer, layers.Dense)
        for variable in layer.weights
        if variable.name == "kernel"
    ]
    if not dense_kernels:
        raise ValueError(f"Model {model.name!r} has no Dense layer")
    return dense_kernels[-1]
