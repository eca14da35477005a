"""GPU-bound workers: the engine, KV transfer, and the binding of a Celery worker to a device."""
