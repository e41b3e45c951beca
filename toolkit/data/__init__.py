"""Data: dataset specs, sources (official files, class folders, split files), listing and
bad-file reports, decoding and the decode-once cache.

    DataOptions ─► load_data ─► DataBundle: uint8 train / val / test Splits, mean/std,
                                fingerprint (the data's identity in every checkpoint)
"""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "carve": ("carve_val",),
    "mapped": ("MappedImages",),
    "sources": ("DATA_ENV", "default_data_root", "load_data"),
    "specs": (
        "BAD_FILE_POLICIES",
        "DATASETS",
        "DataBundle",
        "DataOptions",
        "DatasetSpec",
        "Split",
        "get_spec",
        "spec_for_classes",
    ),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
