"""Benchmark suite: Token Gateway against nginx, HAProxy jwt_verify and a plain aiohttp+pyjwt proxy."""
