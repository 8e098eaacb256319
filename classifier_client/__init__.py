"""A client for the ImageClassifier service: BentoML's HTTP client, with retries on overload."""

from .retry import RetryingClient, call_with_retries

__all__ = ["RetryingClient", "call_with_retries"]
