"""ExGra-Med on transformers-native VLMs (Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ...): any folder that
`AutoModelForImageTextToText` loads.

The alignment objective is a head beside the model (`head.AlignedVLM`, weights in their own file next to the model's
unchanged ones); records go through the model's own processor and chat template (`data`); training, evaluation and
serving reuse the project's commands (`train`, `inference`, `serving`); `tiny` writes tiny random models of each
supported architecture for tests and the demo. The LLaVA-Med / ExGra-Med reference path (`exgra_med.model`) is
separate and unchanged.
"""
