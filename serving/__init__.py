"""Serving exported models, torch-free: one server with two doors onto the same models.

    core (this folder)  preprocess, uploads, classifier, catalog, answer: shared by both
                        doors and by toolkit (predict, export, audit, data decoding)
    page/               the Gradio page for people
    api/                the inference API for programs: Open Inference Protocol v2,
                        /classify, health, Prometheus metrics
    app, options,       the server: both doors on one port (`python -m serving.app`), its
    limits              command line, and the cap on every request body

The core imports neither door, and neither door imports the other (tests/test_layout.py).
"""
