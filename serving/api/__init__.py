"""The inference API for programs, beside the page in the same server: the routes
(routes), the Open Inference Protocol's model description (oip) and tensors (oip_infer),
what stands before a model (guards) and the Prometheus metrics (metrics)."""

from serving.api.routes import DEFAULT_MAX_IN_FLIGHT, InferenceApi

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "InferenceApi"]
