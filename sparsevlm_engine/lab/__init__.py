"""Accuracy lab: a small offline VLM (EfficientNet-Lite0 -> projector -> SmolLM2-135M) and its scene-VQA task."""
