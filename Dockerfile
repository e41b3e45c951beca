# The demo as a slim image: onnxruntime + Gradio serving the shipped models, no torch, no toolkit;
# the inference API (Open Inference Protocol v2, /classify, /metrics) on the same port.
#
#   docker build -t toolkit-demo .
#   docker run --rm -p 7860:7860 toolkit-demo                # then open http://127.0.0.1:7860
#   docker run --rm -p 7860:7860 -e TOOLKIT_AUTH=user:password toolkit-demo
#
# The packages come from serving/requirements.lock: every package the app needs, transitive
# ones included, pinned to one version with the SHA-256 of each of its files, so the image
# rebuilds the same and pip refuses anything else. Regenerate it after changing
# serving/requirements.txt (the few direct pins it is compiled from), with uv:
#
#   uv pip compile serving/requirements.txt --generate-hashes --python-version 3.11 \
#       --python-platform x86_64-manylinux_2_28 -o serving/requirements.lock
#
# (--python-version must match the FROM line below.) tests/test_packaging.py checks that the
# lock pins exactly what requirements.txt names, with hashes, and (slow) builds the same
# environment in a fresh venv with this RUN's pip arguments, since Docker is not always at hand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app

# Dependencies first, so editing the app or swapping models does not reinstall them.
COPY serving/requirements.lock serving/requirements.lock
RUN pip install --require-hashes --no-deps --only-binary :all: -r serving/requirements.lock

COPY serving/ serving/
COPY artifacts/ artifacts/

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 7860
# The inference API's readiness probe (no password needed, even with TOOLKIT_AUTH): 200 once
# every model has loaded and run, and urlopen fails on anything else.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/v2/health/ready', timeout=4)"]

# What makes `docker stop` prompt: it sends STOPSIGNAL to PID 1, and PID 1 is python itself
# (CMD in exec form: no shell in between to swallow the signal). The kernel delivers a signal
# to a PID namespace's first process only if it installed a handler for it, and Python has
# none for SIGTERM, so an unhandled SIGTERM would be ignored and the stop would wait out
# Docker's 10 s grace period for SIGKILL. serving/app.py handles SIGTERM like Ctrl-C (the
# server closes, the process exits 0) in about half a second; tests/test_packaging.py checks it
# as PID 1 of a new PID namespace. No --init is needed: the app starts no child processes.
STOPSIGNAL SIGTERM

# Inside the container the app must listen on every interface for -p to reach it.
CMD ["python", "-m", "serving.app", "--artifacts", "artifacts", "--host", "0.0.0.0", "--port", "7860"]
