"""Export: a run's best.pt to a verified ONNX model (metadata inside, parity on the test
split), its INT8 / fp16 variants, latency benchmarks, a Triton model repository, and the
artifacts/ folder the app serves.

    best.pt ─► export_run ─► RUN/export/ (model.onnx, model.json, export-report.json)
            ─► package_run ─► artifacts/<dataset>-<model>/
"""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "bench": ("Timing", "bench_models"),
    "exporter": ("export_run",),
    "package": ("package_run",),
    "parity": ("REQUIRED_AGREEMENT",),
    "tables": ("print_bench", "print_report"),
    "triton": ("write_triton_repo",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
