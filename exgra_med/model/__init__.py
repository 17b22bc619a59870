"""The LLaVA-style model: config, vision towers, connectors, the composite model and its loaders."""

from transformers import AutoConfig

from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.modeling import ExGraMedForConditionalGeneration, ExGraMedOutput

AutoConfig.register(ExGraMedConfig.model_type, ExGraMedConfig, exist_ok=True)

__all__ = ["ExGraMedConfig", "ExGraMedForConditionalGeneration", "ExGraMedOutput"]
