"""The pure core of the relay: protocol, merge patches, hub and throttle; and the Python client's stream parsing.

Rule: nothing in this package does I/O. No redis, flask, flask_sock, gevent, celery, panel or bokeh imports, no
sockets, no threads, and no reads of the clock (nothing from the time module): callers pass the time in. That is
what lets the same core serve the gevent sidecar and an asyncio front, and lets its tests drive time by hand.
"""
