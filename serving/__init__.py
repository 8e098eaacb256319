"""Torch-free serving code used by service.py.

The flow of a request, by file: preprocess.py (upload -> decode -> pixels), runtime.py (batch ->
ONNX Runtime), postprocess.py (probabilities -> top-k), schemas.py (JSON). contract.py is what the
model store entry promises; settings.py is configuration.yaml.
"""
