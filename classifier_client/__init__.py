"""Clients for the project's services, with retries on overload: BentoML's HTTP client for
ImageClassifier, plain HTTP for ObjectDetector's /detect (its threshold form fields)."""

from .detector import DetectOptions, DetectorClient
from .retry import RetryingClient, call_with_retries

__all__ = ["DetectOptions", "DetectorClient", "RetryingClient", "call_with_retries"]
