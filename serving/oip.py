"""Moved to serving.api.oip. toolkit/export/triton.py still imports `triton_name` from here;
once it imports serving.api.oip, delete this module."""

from serving.api.oip import triton_name

__all__ = ["triton_name"]
