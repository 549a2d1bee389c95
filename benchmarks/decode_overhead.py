"""Where a decode step's wall time goes outside ONNX Runtime: one exported bundle, decoding GEN new
tokens after a PROMPT-token prompt as ``llamacpp_anchor.py --pair`` times it (``generate``, the
same clock), with each graph call (``run_with_iobinding``) and each ``OnnxPipeline.decode_step``
timed on the side. Per decode step: the wall time between tokens, the part inside
``decode_step`` and the part inside ONNX Runtime; the rest of ``decode_step`` is building and
binding the step's feeds, the rest of the wall time is the generation loop (logits processors,
argmax, the streamer).

    python benchmarks/decode_overhead.py out/b576-int8-gqa2.onnx --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Timed:
    """An InferenceSession whose ``run_with_iobinding`` calls are timed into ``calls``."""

    def __init__(self, sess, calls: list[float]):
        self._sess, self._calls = sess, calls

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def run_with_iobinding(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self._sess.run_with_iobinding(*args, **kwargs)
        finally:
            self._calls.append(time.perf_counter() - t)


def main(argv=None) -> int:
    import llamacpp_anchor as la

    from composer.analysis.bench import TokenClock
    from composer.analysis.report import cpu_info
    from composer.export.runtime import OnnxPipeline, default_session_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="an exported bundle (compose export)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="generations timed (after one warm-up)")
    a = ap.parse_args(argv)
    pipe = OnnxPipeline(a.bundle, session_options=default_session_options(False, a.threads))
    batch = la.prompt_of(pipe, la.PROMPT)
    la.composer_decode(pipe, batch)  # warm-up
    calls: list[float] = []
    pipe.sessions = {k: _Timed(v, calls) for k, v in pipe.sessions.items()}
    steps: list[float] = []
    decode_step = pipe.decode_step

    def timed_step(tokens, state):
        t = time.perf_counter()
        try:
            return decode_step(tokens, state)
        finally:
            steps.append(time.perf_counter() - t)

    pipe.decode_step = timed_step
    print(f"CPU: {cpu_info()['model']}; {a.threads} threads; {a.bundle}; {la.PROMPT}-token prompt, {la.GEN} new tokens")
    print("| round | tok/s | wall per step | in decode_step | in ONNX Runtime | feeds and bindings | generation loop |")
    print("|---|---|---|---|---|---|---|")
    for r in range(a.rounds):
        calls.clear()
        steps.clear()
        clock = TokenClock(skip_prompt=False)
        pipe.generate(**batch, max_new_tokens=la.GEN, eos_token_id=[], streamer=clock)
        n = len(clock.times) - 1
        wall = (clock.times[-1] - clock.times[0]) / n
        prefill_calls = len(calls) - len(steps) * len(pipe.manifest.stages)
        ort, step = sum(calls[prefill_calls:]) / len(steps), sum(steps) / len(steps)
        ms = lambda v: f"{v * 1e3:.2f} ms"  # noqa: E731
        print(
            f"| {r + 1} | {1 / wall:.1f} | {ms(wall)} | {ms(step)} | {ms(ort)} | {ms(step - ort)} | {ms(wall - step)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
