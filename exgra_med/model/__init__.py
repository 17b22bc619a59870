"""The LLaVA-style model: config, vision towers, connectors, the composite model and its loaders.

Importing this package (which `import exgra_med` does) registers the config, model and processor with transformers'
Auto classes, so that `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` load ExGra-Med checkpoints
(local folders or Hub ids) without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.modeling import ExGraMedForConditionalGeneration, ExGraMedOutput
from exgra_med.model.processing import ExGraMedProcessor

AutoConfig.register(ExGraMedConfig.model_type, ExGraMedConfig, exist_ok=True)
AutoModelForImageTextToText.register(ExGraMedConfig, ExGraMedForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ExGraMedConfig, ExGraMedProcessor, exist_ok=True)

__all__ = ["ExGraMedConfig", "ExGraMedForConditionalGeneration", "ExGraMedOutput", "ExGraMedProcessor"]
