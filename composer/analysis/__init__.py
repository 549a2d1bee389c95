"""composer.analysis: what composer measures and estimates about a composed model.

- ``flops``: the analytic FLOPs model (docs/architecture.md, "FLOPs")
- ``summary``: the component table of ``compose build`` / ``inspect`` and the model card
- ``plan``: ``compose plan``, prefill/decode FLOPs and KV memory for every k
- ``bench``: ``compose bench``, ONNX Runtime / torch / HF latency at k vs 0 in one process
- ``probe``: ``compose probe``, IMA-style alignment per layer and the loss at each candidate k
"""
