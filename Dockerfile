# The demo as a slim image: onnxruntime + Gradio serving the shipped models, no torch, no toolkit.
#
#   docker build -t toolkit-demo .
#   docker run --rm -p 7860:7860 toolkit-demo                # then open http://127.0.0.1:7860
#   docker run --rm -p 7860:7860 -e TOOLKIT_AUTH=user:password toolkit-demo
#
# tests/test_app.py (slow) builds the same environment in a fresh venv from the same
# requirements file and runs the app's smoke test in it, since Docker is not always at hand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app

# Dependencies first, so editing the app or swapping models does not reinstall them.
COPY serving/requirements.txt serving/requirements.txt
RUN pip install -r serving/requirements.txt

COPY serving/ serving/
COPY artifacts/ artifacts/

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]

# Inside the container the app must listen on every interface for -p to reach it.
CMD ["python", "-m", "serving.app", "--artifacts", "artifacts", "--host", "0.0.0.0", "--port", "7860"]
