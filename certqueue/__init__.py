"""certqueue: a fleet TLS certificate manager on Celery."""

__version__ = "0.1.0"
