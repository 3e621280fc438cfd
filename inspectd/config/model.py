"""[model]: which model runs, where, and the rules that turn its outputs into verdicts and masks."""

from __future__ import annotations

__all__ = ["ModelConfig", "MaskRuleText"]

from typing import Annotated, Literal

from pydantic import AfterValidator, model_validator

from inspectd.config.base import PathText, Reload, Section, setting
from inspectd.model.deployable import BUILTIN_DEMO_MODEL
from inspectd.model.masks import MaskRule

E, C = Reload.ENGINE, Reload.CONTEXT


def _mask_rule(value: str) -> str:
    MaskRule.parse(value)  # ValueError naming what is wrong
    return value


MaskRuleText = Annotated[str, AfterValidator(_mask_rule)]  # probability:P | relative:D | quantile:Q | minmax:M


class ModelConfig(Section):
    path: PathText = setting(
        BUILTIN_DEMO_MODEL, reload=E, description="deployable .keras model; 'builtin:demo' is the bundled demo model"
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
    precision: Literal["float32", "mixed_float16"] = setting(
        "float32", reload=E, description="mixed_float16 on GPUs with tensor cores"
    )
    xla: bool = setting(
        False, reload=E, description="jit_compile the model (the resize before it stays outside; slower on CPU, measured)"
    )
    runtime: Literal["auto", "tensorflow", "onnxruntime", "openvino"] = setting(
        "auto",
        reload=E,
        description="what runs the model: auto = the fastest installed for the device (on a CPU "
        "onnxruntime, then openvino, else tensorflow; on a GPU, or with precision/xla set, tensorflow); the .keras "
        "file is converted once and cached",
    )
    cache_dir: PathText = setting(
        "", reload=E, description="where converted models are kept (default: systemd's CacheDirectory, else ~/.cache/inspectd)"
    )

    @model_validator(mode="after")
    def _one_mask_setting(self) -> ModelConfig:
        if self.mask_rule is not None and self.mask_threshold is not None:
            raise ValueError("set model.mask_rule or model.mask_threshold (= mask_rule probability:VALUE), not both")
        return self
