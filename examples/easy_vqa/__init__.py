"""The easy-VQA demo's own machinery (`make demo`): tower pre-training, rationale answers, probes. See README.md."""
