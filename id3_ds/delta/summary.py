"""What a delta holds, at a glance: entries per parameter and per layer, total, density, size, base, and
for a LoRA run's delta its LoRA settings and folded modules, for a classification run's its new head tensors
and config updates.

Reads and validates the delta (no base needed): a delta that `inspect` shows is one `merge` can read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from id3_ds.delta.format import CONFIG_FILE, DELTA_FILE, FORMAT_VERSION, load_delta

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    """'layer N' for transformer-block parameters (Llama, GPT-2, BERT naming); 'other' for the rest."""
    m = _LAYER.search(name)
    return f"layer {int(m.group(1))}" if m else "other"


# Parameter-name pieces that say what kind of module a tensor belongs to, whatever the model family.
_NORM = re.compile(r"norm|^ln_?\w*$", re.IGNORECASE)  # input_layernorm, LayerNorm, norm, ln_1, ln_f
_EMBED = re.compile(r"embed|^wte$|^wpe$", re.IGNORECASE)
_HEAD = {"lm_head", "classifier", "score", "pooler", "qa_outputs"}
_LEAF = {"weight", "bias", "default"}  # the tensor inside a module (PEFT adds 'default')
# Order of block columns a reader expects (attention, then MLP); unknown kinds follow alphabetically.
_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "gate_proj", "up_proj", "down_proj"]


def _module_path(name: str) -> list[str]:
    """The module a parameter belongs to, inside its transformer block when it is in one, as name parts."""
    m = _LAYER.search(name)
    rest = name[m.end() :] if m else name
    return [p for p in rest.split(".") if p not in _LEAF]


def _kind(parts: list[str]) -> str | None:
    """'norm', 'embed' or 'head' for those families of modules, else None (named by their own path)."""
    if any(_NORM.search(p) for p in parts):
        return "norm"
    if any(_EMBED.search(p) for p in parts):
        return "embed"
    if parts and parts[0] in _HEAD or any(p in _HEAD for p in parts):
        return "head"
    return None


def module_labels(names: list[str]) -> dict[str, str]:
    """A short column label per parameter for a layer x module table: 'q_proj', 'mlp.c_proj', 'norm', 'head'.

    Norms, embeddings and heads are grouped under one word each. Other modules get the shortest tail of
    their in-block path that names no other module: Llama's `self_attn.q_proj` is `q_proj`, while GPT-2's
    `attn.c_proj` and `mlp.c_proj` keep their parent. Weight and bias of one module share a label.
    """
    paths = {n: _module_path(n) for n in names}
    kinds = {n: _kind(p) for n, p in paths.items()}
    others = {tuple(p) for n, p in paths.items() if kinds[n] is None}
    labels = {}
    for n, p in paths.items():
        if kinds[n] is not None:
            labels[n] = kinds[n]
            continue
        lora = len(p) > 1 and p[-1].startswith("lora_")  # a LoRA matrix is named with its module: q_proj.lora_A
        for k in range(1 + lora, len(p) + 1):
            tail = tuple(p[-k:])
            if all(q == tuple(p) or q[-k:] != tail for q in others):
                break
        labels[n] = ".".join(p[-k:]) if p else n
    return labels


def label_order(labels: list[str]) -> list[str]:
    """Columns in reading order: embeddings, attention, MLP, other block modules (in the order given: pass
    labels in model order), norms, head."""

    def key(label: str) -> tuple[int, int]:
        leaf = label.split(".")[-1] if not label.split(".")[-1].startswith("lora_") else label.split(".")[-2]
        if label == "embed":
            return (0, 0)
        if label in ("norm", "head"):
            return (2, label == "head")
        return (1, _ORDER.index(leaf) if leaf in _ORDER else len(_ORDER))

    return sorted(dict.fromkeys(labels), key=key)


def summarize(delta_dir: str | os.PathLike) -> dict:
    """A JSON-ready summary of a delta directory."""
    delta = load_delta(delta_dir)
    cfg = delta.config
    params = {}
    layers: dict[str, dict] = {}
    touched_numel = 0
    items = [(name, p, "dense" if p.dense else "sparse") for name, p in delta.params.items()]
    lora = None
    if delta.lora is not None:
        lo = delta.lora
        for m in lo.modules.values():
            items += [(m.a_name, m.a, "lora A"), (m.b_name, m.b, "lora B")]
        lora = {
            "rank": lo.rank,
            "alpha": lo.alpha,
            "scale": lo.scale,
            "target_modules": lo.target_modules,
            "modules": {w: {"A": m.a_name, "B": m.b_name} for w, m in sorted(lo.modules.items())},
            "init_entries": sum(m.a_init.numel() for m in lo.modules.values()),
        }
    for name, p, storage in sorted(items, key=lambda x: x[0]):
        touched_numel += p.numel
        params[name] = {
            "shape": list(p.shape),
            "entries": p.entries,
            "numel": p.numel,
            "density": p.entries / p.numel if p.numel else 0.0,
            "storage": storage,
        }
        agg = layers.setdefault(layer_of(name), {"entries": 0, "numel": 0})
        agg["entries"] += p.entries
        agg["numel"] += p.numel
    layer_order = sorted(layers, key=lambda k: (k == "other", int(k.split()[1]) if k != "other" else 0))
    base = cfg["base"]
    base_numel = base.get("numel") if isinstance(base.get("numel"), int) else None
    root = Path(delta_dir)
    total = delta.total_entries
    return {
        "path": str(root),
        "format": f"{cfg['format']} v{cfg['version']}",
        "format_version": cfg["version"],  # validated by load_delta: an int in [1, FORMAT_VERSION]
        "dtype": cfg["dtype"],
        "total_entries": total,
        "density_touched": total / touched_numel if touched_numel else 0.0,
        "density_model": total / base_numel if base_numel else None,
        "file_bytes": sum((root / f).stat().st_size for f in (DELTA_FILE, CONFIG_FILE)),
        "base": {
            "name_or_path": base.get("name_or_path"),
            "numel": base_numel,
            "fingerprint": base["fingerprint"]["digest"],
        },
        "id3": {k: cfg.get("id3", {}).get(k) for k in ("budget", "eps", "exp", "steps")},
        "lora": lora,
        "new": {n: {"shape": list(t.shape), "numel": t.numel()} for n, t in sorted(delta.new.items())},
        "config_updates": delta.config_updates,
        "params": params,
        "layers": {k: layers[k] for k in layer_order},
    }


def render(s: dict) -> str:
    """A plain-text table of `summarize`'s output."""
    lines = [
        f"delta      {s['path']}  (values {s['dtype']})",
        f"format     id3-delta version {s['format_version']} (this id3-ds reads versions 1 to {FORMAT_VERSION})",
        f"base       {s['base']['name_or_path']}  fingerprint sha256:{s['base']['fingerprint']}",
        "id3        " + "  ".join(f"{k}={v}" for k, v in s["id3"].items()),
        f"entries    {s['total_entries']:,}"
        + (f"  density {s['density_model']:.3e} of {s['base']['numel']:,} base entries" if s["density_model"] else "")
        + f"  ({s['density_touched']:.3e} of the touched tensors)",
        f"file size  {s['file_bytes']:,} bytes",
    ]
    lo = s.get("lora")
    if lo:
        lines.append(
            f"lora       rank={lo['rank']} alpha={lo['alpha']} (scale {lo['scale']:g}) "
            f"target_modules={lo['target_modules']}  {len(lo['modules'])} modules folded as W + scale*B@A, "
            f"A init {lo['init_entries']:,} entries (dense)"
        )
    for name, e in (s.get("new") or {}).items():
        lines.append(f"new        {name} {e['shape']} ({e['numel']:,} entries, full value: a fresh head)")
    if s.get("config_updates"):
        lines.append("config     " + "  ".join(f"{k}={v}" for k, v in s["config_updates"].items()))
    lines += [
        "",
        f"{'parameter':<60} {'entries':>12} {'numel':>12} {'density':>9} storage",
    ]
    for name, p in s["params"].items():
        lines.append(f"{name:<60} {p['entries']:>12,} {p['numel']:>12,} {p['density']:>9.2e} {p['storage']}")
    lines += ["", f"{'layer':<60} {'entries':>12} {'numel':>12} {'density':>9}"]
    for name, a in s["layers"].items():
        d = a["entries"] / a["numel"] if a["numel"] else 0.0
        lines.append(f"{name:<60} {a['entries']:>12,} {a['numel']:>12,} {d:>9.2e}")
    return "\n".join(lines)
