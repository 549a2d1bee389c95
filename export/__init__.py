"""composer.export: split ONNX export (early text graph, late multimodal graph) and the ONNX
Runtime pipeline. See DESIGN.md "Export bundle"."""
