"""composer.analysis: what composer measures and estimates about a composed model.

- ``flops``: the analytic FLOPs model (docs/architecture.md, "FLOPs")
- ``summary``: the component table of ``compose build`` / ``inspect`` and the model card
- ``plan``: ``compose plan``, prefill/decode FLOPs and KV memory for every k
- ``bench``: ``compose bench``, ONNX Runtime / torch / HF latency at k vs 0 in one process
- ``reference``: the Hugging Face reference at k = 0 (LlavaForConditionalGeneration on the model's
  tensors), timed by ``bench`` and shared with the parity tests
- ``memory``: ``PeakMemory``, the peak memory of a block (RSS on a CPU, CUDA allocations or device use)
- ``report``: ``compose bench``'s table, CPU facts and library versions
- ``probe``: ``compose probe``, IMA-style alignment per layer and the loss at each candidate k
"""
