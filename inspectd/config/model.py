"""[model] and [[models]]: which models run, where, and the rules that turn their outputs into verdicts and masks.

`[model]` is the short form of one model (id "default"); `[[models]]` tables name several, each
camera choosing its own (`[[cameras]] model`). `Settings.model_entries` gives the models either way.
"""

from __future__ import annotations

__all__ = ["ModelConfig", "ModelEntry", "MaskRuleText", "MODEL_ID", "DEFAULT_MODEL_ID"]

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from inspectd.config.base import PathText, Reload, Section, setting
from inspectd.model.deployable import BUILTIN_DEMO_MODEL
from inspectd.model.masks import MaskRule

E, C = Reload.ENGINE, Reload.CONTEXT
MODEL_ID = r"^[a-z0-9_-]{1,64}$"
DEFAULT_MODEL_ID = "default"  # the id of the one model of the short form, [model]


def _mask_rule(value: str) -> str:
    MaskRule.parse(value)  # ValueError naming what is wrong
    return value


MaskRuleText = Annotated[str, AfterValidator(_mask_rule)]  # probability:P | relative:D | quantile:Q | minmax:M


class ModelConfig(Section):
    path: PathText = setting(
        BUILTIN_DEMO_MODEL,
        reload=E,
        description=(
            "deployable .keras model, or an exported model folder (inspectd export --out; runs without TensorFlow); "
            "'builtin:demo' is the bundled demo model"
        ),
    )
    threshold: float | None = setting(
        None, reload=C, ge=0, le=1, description="image-level decision on the score (default: the model's)"
    )
    mask_threshold: float | None = setting(
        None,
        reload=C,
        ge=0,
        le=1,
        description="a fixed per-pixel threshold on "
        "sigmoid(cam_logits), i.e. mask_rule probability:VALUE (default: the "
        "model's rule)",
    )
    mask_rule: MaskRuleText | None = setting(
        None,
        reload=C,
        description="how the map becomes a mask: probability:P | "
        "relative:D | quantile:Q | minmax:M (default: the model's own rule; see "
        "docs/model.md)",
    )
    device: str = setting("auto", reload=E, pattern=r"^(auto|cpu|gpu:\d+)$", description="auto | cpu | gpu:N")
    precision: Literal["float32", "bfloat16", "float16", "int8"] = setting(
        "float32",
        reload=E,
        description="what the model computes in: float32 (the same outputs on every CPU) | bfloat16 (openvino on "
        "CPUs with it; tensorflow) | float16 (tensorflow on a GPU; openvino where the CPU has it) | int8 (onnxruntime, "
        "openvino: the calibrated model `inspectd export --int8` left in the cache); anything but float32 runs only "
        "after `inspectd export --precision` passed its quality gate (docs/performance.md#precision)",
    )
    xla: bool = setting(
        False, reload=E, description="jit_compile the model (the resize before it stays outside; slower on CPU, measured)"
    )
    runtime: Literal["auto", "tensorflow", "onnxruntime", "openvino"] = setting(
        "auto",
        reload=E,
        description="what runs the model: auto = measured on the first start (each installed runtime, OpenVINO's "
        "hint and, with batching.max_batch auto, the batch size, at this precision; the fastest wins and the choice "
        "is cached per model and machine); the .keras file is converted once and cached",
    )
    cache_dir: PathText = setting(
        "", reload=E, description="where converted models are kept (default: systemd's CacheDirectory, else ~/.cache/inspectd)"
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _old_name(cls, value):
        return "float16" if value == "mixed_float16" else value  # its name before precision covered every runtime

    @model_validator(mode="after")
    def _one_mask_setting(self) -> ModelConfig:
        if self.mask_rule is not None and self.mask_threshold is not None:
            raise ValueError("set model.mask_rule or model.mask_threshold (= mask_rule probability:VALUE), not both")
        return self


class ModelEntry(ModelConfig):
    """One [[models]] table: a model with an id of its own (and the keys of [model]), or a shadow of another."""

    id: str = Field(pattern=MODEL_ID, description="[a-z0-9_-]+; what cameras name (`model`), in metric labels and events")
    shadow_of: str | None = setting(
        None,
        reload=C,
        pattern=MODEL_ID,
        description="run as the shadow of this model: on (a sample of) its frames, never publishing, its agreement "
        "measured (docs/models.md#a-shadow-model)",
    )
    sample: float = setting(
        1.0, reload=C, gt=0, le=1, description="a shadow: the share of its model's inferred frames it also runs"
    )
