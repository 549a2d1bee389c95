"""composer.export: split ONNX export (early text graph, late multimodal graph) and the ONNX
Runtime pipeline. See docs/architecture.md and docs/export.md.

``from composer.export import export_onnx, OnnxPipeline, verify_bundle, read_manifest, Manifest``
(imported on first use: ``import composer.export`` alone loads neither onnx nor onnxruntime)."""

from __future__ import annotations

from composer.lazy import lazy_attributes

_LAZY = {
    "export_onnx": "composer.export.exporter",
    "OnnxPipeline": "composer.export.runtime",
    "verify_bundle": "composer.export.verify",
    "read_manifest": "composer.export.manifest",
    "Manifest": "composer.export.manifest",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
