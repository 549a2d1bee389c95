"""What a frozen vision encoder's features hold about the shapes task, layer by layer: linear probes.

For the demo's pictures (benchmarks/deepinsert_quality.py's task) encoded by the image encoder of a
spec (default ``specs/smol/llava_dinov2_demo.yaml``: DINOv2 ViT-S/14 at 126 pixels, 9 x 9 patches):

- per picture column (the mean of its 3 x 9 patch features), what it holds: empty or one of 15
  colour-shape cells; 1,200 training and 400 held-out pictures of disjoint layouts; accuracy, and
  on occupied cells the colour and the shape alone;
- per patch token, its column (left, middle, right): 200 training and 100 held-out pictures;
- per picture column, its colour when the colour-shape pair is new: a colour probe fit on 1,000
  pictures whose objects avoid five colour-shape pairs (``UNSEEN_PAIRS``), scored on the objects of
  those pairs in 400 other pictures. Whether colour is readable apart from shape is what the
  demo's colour answers on new combinations need.

Each probe is a logistic regression (Adam, 300 / 200 steps) on standardised features of one layer
(0: the embeddings, i: the output of layer i, the last: after the final layernorm).

    python benchmarks/encoder_readout.py --threads 2
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinsert_quality as dq  # noqa: E402

SPEC = dq.ROOT / "specs" / "smol" / "llava_dinov2_demo.yaml"
UNSEEN_PAIRS = {
    ("green", "triangle"),
    ("red", "square"),
    ("blue", "circle"),
    ("yellow", "triangle"),
    ("purple", "square"),
}


def encode(enc, proc, scenes, n: int, seed: int, with_targets: bool = True):
    rng = random.Random(seed)
    imgs, ys = [], []
    for _ in range(n):
        sc = scenes[rng.randrange(len(scenes))]
        imgs.append(dq.draw(sc, random.Random(rng.randrange(2**31))))
        ys.append(dq.cell_targets(sc))
    feats = []
    with torch.no_grad():
        for i in range(0, n, 32):
            pv = proc(images=imgs[i : i + 32], return_tensors="pt")["pixel_values"]
            out = enc.model(pixel_values=pv, output_hidden_states=True)
            hs = [*out.hidden_states, out.last_hidden_state]
            feats.append(torch.stack([h[:, 1:] for h in hs], 1))  # (b, layers, tokens, d), CLS dropped
    return torch.cat(feats), torch.tensor(ys)


def probe(x, y, xt, classes: int, steps: int):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (xt @ w + b).argmax(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    import yaml

    from composer.builder import build_encoder
    from composer.spec import parse_spec

    if a.threads:
        torch.set_num_threads(a.threads)
    raw = yaml.safe_load(a.spec.read_text())
    spec = parse_spec(raw, str(a.spec))
    enc, proc = build_encoder(spec.modalities["image"].encoder, "modalities.image.encoder", spec.source_dir)
    enc.eval()
    side = int(enc.num_tokens**0.5)
    tr, te = dq.split_scenes(0)
    xtr, ytr = encode(enc, proc, tr, 1200, 1)
    xte, yte = encode(enc, proc, te, 400, 2)

    def columns(x):  # (n, layers, side*side, d) -> (n, layers, 3, d)
        g = x.reshape(x.shape[0], x.shape[1], side, side, -1)
        w = side // 3
        return torch.stack([g[:, :, :, w * c : w * (c + 1)].mean((2, 3)) for c in range(3)], 2)

    ctr, cte = columns(xtr), columns(xte)
    names = dq.CELL_CLASSES
    colours = list(dq.COLOURS)
    unseen = [sc for sc in dq.all_scenes() if any((c, sh) in UNSEEN_PAIRS for _, sh, c in sc)]
    seen = [sc for sc in dq.all_scenes() if sc not in unseen]
    xs, ys = encode(enc, proc, seen, 1000, 3)
    xu, yu = encode(enc, proc, unseen, 400, 4)
    cs, cu = columns(xs), columns(xu)

    def colour_index(y):  # per column: its colour's index, -1 when empty
        return torch.tensor([colours.index(names[t].split()[0]) if t else -1 for t in y.reshape(-1).tolist()])

    colour_s, colour_u = colour_index(ys), colour_index(yu)
    new_pair = torch.tensor([t > 0 and tuple(names[t].split()) in UNSEEN_PAIRS for t in yu.reshape(-1).tolist()])
    print("layer | cell | colour | shape | token column | colour, unseen pairs")
    col = (torch.arange(side * side) % side) // (side // 3)
    for layer in range(ctr.shape[1]):
        d = ctr.shape[-1]
        pred = probe(ctr[:, layer].reshape(-1, d), ytr.reshape(-1), cte[:, layer].reshape(-1, d), 16, 300)
        truth = yte.reshape(-1)
        occ = truth > 0
        pairs = list(zip(pred[occ].tolist(), truth[occ].tolist(), strict=True))
        colour = sum(names[p].split()[0] == names[t].split()[0] for p, t in pairs) / len(pairs)
        shape = sum(names[p].split()[-1] == names[t].split()[-1] for p, t in pairs) / len(pairs)
        tok = probe(xtr[:200, layer].reshape(-1, d), col.repeat(200), xte[:100, layer].reshape(-1, d), 3, 200)
        tok_acc = (tok == col.repeat(100)).float().mean().item()
        cell = (pred == truth).float().mean().item()
        fit = colour_s >= 0
        pc = probe(cs[:, layer].reshape(-1, d)[fit], colour_s[fit], cu[:, layer].reshape(-1, d), len(colours), 300)
        unseen_acc = (pc[new_pair] == colour_u[new_pair]).float().mean().item()
        print(f"{layer} | {cell:.3f} | {colour:.3f} | {shape:.3f} | {tok_acc:.3f} | {unseen_acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
