"""The bundle manifest: what the exporter writes and the runtime reads (cf. onnxruntime-genai's
``genai_config.json``). Validation here gives one clear error naming the bad file."""

from __future__ import annotations

from pathlib import Path

from composer.errors import InputError, read_versioned_json

# 2: the LLM graphs take KV buffers written in place (write_index, cache_slots/cache_valid);
# 1 (concatenating past + new KV) bundles must be exported again.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# quantization schemes a bundle may record -> weight bits (composer.export.quantize makes them)
SCHEMES = {"int8": 8, "int4": 4, "w8a8": 8}


def late_graph_name(start: int, n_late: int) -> str:
    """``late_multimodal.onnx`` for one insertion layer, ``late_multimodal.k<K>.onnx`` for several."""
    return "late_multimodal.onnx" if n_late == 1 else f"late_multimodal.k{start}.onnx"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(bundle: str | Path, *, check_files: bool = True) -> dict:
    """Load and check ``BUNDLE/manifest.json``: known format version, every graph and its
    external-data files present and readable."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{root}: not an ONNX bundle (no {MANIFEST})")
    manifest = read_versioned_json(
        path, FORMAT_VERSION, "the bundle manifest", hint="export the model again with this composer (compose export)"
    )
    for key in ("stages", "encoders", "graphs", "llm", "kv", "generation"):
        if key not in manifest:
            raise InputError(f"{path}: missing key {key!r}")
    graphs = manifest["graphs"]
    try:
        named = [s["graph"] for s in manifest["stages"]] + [e["graph"] for e in manifest["encoders"].values()]
    except (AttributeError, TypeError, KeyError):
        named = None
    if named is None or not isinstance(graphs, dict):
        raise InputError(f"{path}: malformed 'stages', 'encoders' or 'graphs'")
    unknown = sorted(str(g) for g in named if g not in graphs)
    if unknown:
        raise InputError(f"{path}: stages/encoders name graphs the manifest does not list: {unknown}")
    dirs = [manifest.get("tokenizer", "tokenizer")] + [e.get("processor") for e in manifest["encoders"].values()]
    for name in [*graphs, *(d for d in dirs if d)]:
        inside(root, name, f"{path}: names")
    _check_structure(manifest, path)
    if check_files:
        for name in graphs:
            check_graph_file(root / name)
        for d in dirs:
            if d and not (root / d).is_dir():
                raise InputError(f"{root / d}: missing from the bundle")
    return manifest


def inside(root: Path, name: object, what: str) -> Path:
    """``root / name``, refused unless ``name`` is a relative path that stays inside ``root``
    (resolved: no ``..``, no absolute path, no symlink out; in the HF cache, the repo's blobs/
    are inside): a bundle only names its own files."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise InputError(f"{what} {name!r}: not a relative path inside the bundle")
    target = (root / name).resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":  # a bundle in the HF cache: its files are symlinks into ../../blobs
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(a) for a in allowed):
        raise InputError(f"{what} {name!r}: points outside the bundle")
    return root / name


def check_graph_file(path: Path) -> None:
    """The graph parses and every external-data file it names exists and is large enough."""
    import onnx

    if not path.is_file():
        raise InputError(f"{path}: graph file missing from the bundle")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: cannot parse ONNX graph ({type(e).__name__}); the file may be truncated") from None
    needed: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            loc = info["location"]
            needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in needed.items():
        data = inside(path.parent, loc, f"{path}: external data")
        if not data.is_file():
            raise InputError(f"{data}: external data of {path.name} missing from the bundle")
        if data.stat().st_size < end:
            raise InputError(f"{data}: external data of {path.name} is truncated ({data.stat().st_size} < {end} bytes)")


def _check_structure(manifest: dict, path: Path) -> None:
    """The fields the runtime reads, with their types: one error naming the field instead of a
    KeyError or TypeError at the first prompt."""

    def need(where: str, value, kind, ok=lambda v: True, want: str = "") -> None:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not ok(value):
            raise InputError(f"{path}: {where}: want {want or kind.__name__}, got {value!r}"[:300])

    need("dtype", manifest.get("dtype"), str, lambda v: v in ("fp32", "fp16"), "'fp32' or 'fp16'")
    stages = manifest["stages"]
    need("stages", stages, list, lambda v: len(v) >= 2, "a list of at least two stages")
    for i, st in enumerate(stages):
        need(f"stages[{i}]", st, dict)
        for key in ("start", "end"):
            need(f"stages[{i}].{key}", st.get(key), int, lambda v: v >= 0, "an integer >= 0")
        need(f"stages[{i}].enter", st.get("enter"), list)
        need(f"stages[{i}].last", st.get("last"), bool)
    need("stages[-1].last", stages[-1].get("last"), bool, lambda v: v, "true")
    llm, kv, gen = manifest["llm"], manifest["kv"], manifest["generation"]
    need("llm", llm, dict)
    for key in ("num_layers", "hidden_size", "vocab_size"):
        need(f"llm.{key}", llm.get(key), int, lambda v: 0 < v < 2**31, "a positive integer")
    need("kv", kv, dict)
    for key in ("num_kv_heads", "head_dim"):
        need(f"kv.{key}", kv.get(key), int, lambda v: 0 < v < 2**31, "a positive integer")
    need("generation", gen, dict)
    need("generation.eos_token_id", gen.get("eos_token_id"), list)
    need("generation.banned_token_ids", gen.get("banned_token_ids"), list)
    need("generation.pad_token_id", gen.get("pad_token_id"), int)
    need("encoders", manifest["encoders"], dict, lambda v: len(v) > 0, "at least one encoder")
    q = manifest.get("quantization")  # absent in bundles written before quantization existed
    if q is not None:
        need("quantization", q, dict)
        want = " or ".join(repr(k) for k in SCHEMES)
        need("quantization.scheme", q.get("scheme"), str, lambda v: v in SCHEMES, want)
