"""The compression engine: plain torch, no Flask, Celery or Redis.

Every method module exposes one entry point of the same shape,
``(model, spec, data, progress) -> (model, details)``; ``pipeline.compress`` runs
load -> method -> measure -> save around it.
"""
