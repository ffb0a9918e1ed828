"""Celery workers: supervise one job at a time, running its compression in a child process."""
