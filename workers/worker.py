"""Entry point of the worker process: ``celery -A workers.worker worker``."""
from modelpress.config import Settings
from workers.celery_app import make_celery

celery = make_celery(Settings.from_env())
