"""The reference Celery app and its demo jobs, used by the demo, docker-compose, tests and benchmarks.

Not shipped in the wheel: a top-level ``tasks`` package in site-packages would shadow users' own tasks.py.
"""
