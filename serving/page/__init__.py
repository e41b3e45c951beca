"""The Gradio page: the Blocks (blocks), their event functions (handlers) and the model card
they show (card). serving.app serves it beside the inference API."""

from serving.page.blocks import CSS, build_page
from serving.page.handlers import DemoHandlers

__all__ = ["CSS", "DemoHandlers", "build_page"]
