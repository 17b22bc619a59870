"""Serving: one inference engine (`engine.py`) behind the terminal chat, the Gradio demo and the OpenAI-compatible
API. Heavy optional dependencies (gradio, fastapi, uvicorn, bitsandbytes) are imported where they are used."""
