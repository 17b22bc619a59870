"""Transformers-native VLMs (Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ...: any folder `AutoModelForImageTextToText`
loads): the back end (`backend`), the alignment head beside the model (`aligned`), building and saving for training
(`training`), and tiny random models for tests and the demo (`tiny`)."""
