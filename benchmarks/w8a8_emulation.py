"""w8a8's arithmetic emulated in torch, piece by piece, on a saved checkpoint: where the error comes from.

Every ``nn.Linear`` of the LLM is replaced (forward hooks) by the arithmetic of ``compose export
--quantize w8a8``: per-token int8 activations, per-output-channel int8 weights, SmoothQuant with
``alpha``, and the ``outliers`` largest calibration channels of each shared activation kept in fp32
(``composer.export.quantize``). Calibration runs on ``CALIBRATION_PROMPTS`` one at a time, the
comparison on ``--verify``'s prompts (``composer.export.examples.PROMPTS``): top-1 agreement with the
fp32 model over text positions, mean KL(fp32 || quantized) in nats, max logit difference. Each row
switches one piece, so the sources of error can be told apart without exporting a bundle.

    python benchmarks/w8a8_emulation.py out/smol-demo --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

# (label, alpha or None for no smoothing, fp32 channels, quantize activations, quantize weights)
ROWS = (
    ("activations only, no smoothing", None, 0, True, False),
    ("activations only, alpha 0.8", 0.8, 0, True, False),
    ("weights only, no smoothing", None, 0, False, True),
    ("w8a8, no smoothing", None, 0, True, True),
    ("w8a8, alpha 0.8", 0.8, 0, True, True),
    ("w8a8, alpha 0.5", 0.5, 0, True, True),
    ("w8a8, alpha 0.5, 8 fp32 channels", 0.5, 8, True, True),
    ("w8a8, alpha 0.5, 16 fp32 channels (the scheme)", 0.5, 16, True, True),
    ("w8a8, alpha 0.5, 32 fp32 channels", 0.5, 32, True, True),
    ("w8a8, alpha 0.8, 16 fp32 channels", 0.8, 16, True, True),
)


def _per_row(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (per token) and back: the export's uint8 with zero point 128."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return (x / s).round().clamp(-127, 127) * s


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, symmetric int8 per output channel and back."""
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    return (w / s).round().clamp(-127, 127) * s


def _per_block(w: torch.Tensor, block: int) -> torch.Tensor:
    """(vocab, hidden) table, symmetric int8 in blocks of ``block`` along hidden and back (the
    export's token embedding, ``composer.export.quantize.quantize_embedding``)."""
    b = w.reshape(w.shape[0], -1, block)
    s = b.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return ((b / s).round().clamp(-127, 127) * s).reshape(w.shape)


def _groups(linears: dict) -> dict[str, list[str]]:
    """The Linears reading one activation: q/k/v and gate/up share it (as the export's groups)."""
    out: dict[str, list[str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(leaf)
        out.setdefault(f"{parent}.{key}" if key else name, []).append(name)
    return out


def calibrate(model, prompts) -> dict[str, torch.Tensor]:
    """Largest |input| per input channel of each LLM Linear over ``prompts``, one at a time: the
    export's own calibration pass (``activation_ranges``), keyed by Linear name."""
    from composer.export.quantize import _weight_key, activation_ranges

    ranges = activation_ranges(model, prompts)
    return {
        name: torch.from_numpy(ranges[_weight_key(lin.weight.detach().float().T.numpy())])
        for name, lin in _linears(model).items()
    }


def _linears(model) -> dict:
    return {n: m for n, m in model.llm.named_modules() if isinstance(m, torch.nn.Linear)}


def emulate(
    model, batch, amax, *, alpha, fp32_channels, quant_act=True, quant_weight=True, embedding_block=None
) -> torch.Tensor:
    """The model's logits on ``batch`` with every LLM Linear computed as w8a8 would (``amax``:
    ``calibrate``'s statistics; ``alpha`` None: no smoothing), and with ``embedding_block`` the
    token embedding's lookups read its int8 table (blocks of that many weights; None: fp32)."""
    linears = _linears(model)
    hooks = []
    if embedding_block is not None:
        table = _per_block(model.llm.get_input_embeddings().weight.detach(), embedding_block)
        hooks.append(
            model.llm.get_input_embeddings().register_forward_hook(
                lambda mod, inputs, out: torch.nn.functional.embedding(inputs[0], table)
            )
        )
    for names in _groups(linears).values():
        act = amax[names[0]].clamp_min(1e-5)
        n = fp32_channels if act.numel() >= 4 * fp32_channels else 0  # as the export
        fp32 = torch.topk(act, n).indices if n else torch.zeros(0, dtype=torch.long)
        keep = torch.ones_like(act, dtype=torch.bool)
        keep[fp32] = False
        wmax = torch.stack([(linears[m].weight * keep).abs().amax(0) for m in names]).amax(0).clamp_min(1e-5)
        s = (act**alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4) if alpha is not None else torch.ones_like(act)
        inv = torch.where(keep, 1 / s, torch.zeros_like(s))
        for m in names:
            w = linears[m].weight.detach() * s * keep
            wq = _per_channel(w) if quant_weight else w
            w_fp32 = linears[m].weight.detach()[:, fp32]

            def forward(mod, inputs, out, inv=inv, wq=wq, w_fp32=w_fp32, fp32=fp32):
                x = inputs[0]
                xs = x * inv
                y = torch.nn.functional.linear(_per_row(xs) if quant_act else xs, wq, mod.bias)
                return y + x[..., fp32] @ w_fp32.T

            hooks.append(linears[m].register_forward_hook(forward))
    try:
        with torch.no_grad():
            return model(**batch).logits.float()
    finally:
        for h in hooks:
            h.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a directory written by compose build / train")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from composer.export.examples import PROMPTS, sample_batch
    from composer.export.exporter import merged_for_export
    from composer.export.quantize import CALIBRATION_PROMPTS
    from composer.export.verify import _kl
    from composer.model import ComposedModel

    model = merged_for_export(ComposedModel.from_pretrained(args.checkpoint), torch.float32).eval()
    amax = calibrate(model, CALIBRATION_PROMPTS)
    batch = sample_batch(model, PROMPTS)
    with torch.no_grad():
        ref = model(**batch).logits.float()
    ids = batch["input_ids"].numpy()
    text = batch["attention_mask"].bool().numpy() & ~np.isin(ids, list(model.placeholder_ids.values()))
    linears = _linears(model)
    print(f"{args.checkpoint}: {len(linears)} Linears in {len(_groups(linears))} groups, {int(text.sum())} positions")
    print(f"{'':50} {'top-1':>7} {'mean KL':>9} {'max diff':>9}")
    for label, alpha, n_fp32, qa, qw in ROWS:
        got = emulate(model, batch, amax, alpha=alpha, fp32_channels=n_fp32, quant_act=qa, quant_weight=qw)
        kl = _kl(ref.numpy(), got.numpy())[text].mean()
        top1 = (got.argmax(-1) == ref.argmax(-1)).numpy()[text].mean()
        diff = (got - ref).abs().numpy()[text].max()
        print(f"{label:50} {top1:7.1%} {kl:9.4f} {diff:9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
