"""Judging a token for one route: local JWT verification, then the route's own rules."""

from gateway.verify.judge import Judge

__all__ = ["Judge"]
