"""slaq: SLA-tiered LLM inference on Celery queues, scheduled by KV-cache pressure."""

__version__ = "0.1.0"
