"""Token Gateway: a reverse proxy that lets a request through only when its bearer token is valid right now."""

__version__ = "0.1.0"
