"""id3-ds deltas and PEFT adapters, both ways: export a delta as a PEFT SHiRA adapter, import one as a delta.

PEFT's SHiRA (`ShiraConfig`, peft >= 0.21) stores, per adapted `nn.Linear`, `shira_weight` (fp32 values) and
`shira_indices` (int32 [2, n]: rows, columns), and merges W + sparse(values). That is exactly an ID3 delta
on a linear weight, with two constraints this module works around or refuses:

- every adapted layer holds exactly r·(in + out) values for one r in `adapter_config.json`: r is the
  smallest that fits the densest layer, and the other layers are padded with zero updates at entries the
  delta does not touch (zero adds nothing: the merge is unchanged). A layer that would need more than
  in·out values goes whole into `modules_to_save` instead.
- SHiRA adapts linear weights only. Other touched tensors (norms, a Linear's bias, a fresh classification
  head) are carried by PEFT's `modules_to_save`: their module's trained tensors, whole (base + delta). An
  embedding would be copied whole (vocab x hidden), which defeats a sparse adapter, so it is refused unless
  `embeddings="copy"`, with the `id3.targets` setting that keeps a run PEFT-exportable.

The fp32 fix-ups of an id3 delta (docs/delta-format.md) have no place in SHiRA: a value is written as
fl32(d + fix), so a PEFT merge can differ from `id3-ds merge` by one fp32 ulp at those few entries.

Import reads a SHiRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) against its base
and writes an id3 delta: duplicate positions summed, zero updates dropped, `modules_to_save` tensors as
exact dense updates (value - base, with fix-ups).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import Delta, ParamDelta, check_against_base, load_delta, named, write_delta
from id3_ds.errors import ID3Error
from id3_ds.files.atomic import check_out, staged_dir, write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBEDDINGS = ("refuse", "copy")
TARGETS_HINT = (
    'set id3.targets to leave embeddings out (e.g. ["*layers*", "*norm*"], or your model\'s block names) to '
    "keep a run PEFT-exportable"
)


def _architecture(base_dir: Path, delta: Delta) -> str:
    if delta.config_updates and delta.config_updates.get("architectures"):
        return delta.config_updates["architectures"][0]
    cfg = json.loads((base_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise ID3Error(f"{base_dir}/config.json names no architectures: PEFT needs the model class")
    return archs[0]


def _meta_model(base_dir: Path, arch: str, delta: Delta) -> torch.nn.Module:
    """The model class on the meta device (no weights): which module each touched tensor belongs to."""
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ID3Error(f"transformers has no class {arch}: PEFT export needs the model class")
    config = transformers.AutoConfig.from_pretrained(base_dir)
    for k, v in (delta.config_updates or {}).items():
        setattr(config, k, v)
    with torch.device("meta"):
        return cls(config)


def _task_type(arch: str) -> str | None:
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if arch.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def export_peft(
    delta_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    embeddings: str = "refuse",
    force: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write `out/` as a PEFT SHiRA adapter of `base_dir` with this delta's update; returns a summary."""
    if embeddings not in EMBEDDINGS:
        raise ID3Error(f"--peft-embeddings {embeddings!r}: use one of {', '.join(EMBEDDINGS)}")
    base_dir = Path(base_dir)
    delta = load_delta(delta_dir)
    base = BaseModel.open(base_dir)
    check_against_base(delta, base, force=force)
    if delta.lora is not None:
        raise ID3Error(
            f"{named(delta.root)} is a LoRA run's delta: keep the run's PEFT LoRA adapter "
            "(train.save_final_model=true) rather than a SHiRA export"
        )
    out = Path(out)
    check_out(out, overwrite, protect=[base.root, delta.root])
    arch = _architecture(base_dir, delta)
    model = _meta_model(base_dir, arch, delta)
    prefix = getattr(model, "base_model_prefix", "") if delta.new else ""
    modules = dict(model.named_modules())

    def full(name: str) -> str:  # the task model's name of a base tensor
        return f"{prefix}.{name}" if prefix and f"{prefix}.{name}" in tensors else name

    tensors = dict(model.named_parameters(remove_duplicate=False))
    shira: dict[str, tuple[str, ParamDelta]] = {}  # module -> (base name, its weight update)
    whole: set[str] = set()  # modules carried by modules_to_save
    for name, p in delta.params.items():
        mod_name, leaf = full(name).rsplit(".", 1)
        mod = modules.get(mod_name)
        if isinstance(mod, torch.nn.Embedding):
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out_emb is not None and getattr(out_emb, "weight", None) is mod.weight:
                raise ID3Error(
                    f"{named(delta.root)} updates the embedding {name}, which this model ties to its output head: "
                    f"PEFT's modules_to_save would change one and not the other; {TARGETS_HINT}"
                )
            if embeddings == "refuse":
                raise ID3Error(
                    f"{named(delta.root)} updates the embedding {name}, which PEFT's SHiRA cannot hold sparsely "
                    f"(it would copy all {p.numel:,} entries): {TARGETS_HINT}, or pass --peft-embeddings copy"
                )
            whole.add(mod_name)
        elif isinstance(mod, torch.nn.Linear) and leaf == "weight" and not p.dense:
            shira[mod_name] = (name, p)
        else:
            whole.add(mod_name)
    for name in delta.new:
        whole.add(name.rsplit(".", 1)[0])
    for mod_name in list(shira):
        if mod_name in whole:  # its bias is carried whole: the weight goes with it
            del shira[mod_name]
    r = max((math.ceil(p.entries / sum(p.shape)) for _, p in shira.values()), default=1)
    for mod_name, (_, p) in list(shira.items()):
        if r * sum(p.shape) > p.numel:  # SHiRA refuses r(m+n) > m·n: carry this layer whole
            del shira[mod_name]
            whole.add(mod_name)
    out_tensors: dict[str, torch.Tensor] = {}
    padded = 0
    for mod_name, (_, p) in sorted(shira.items()):
        rows, cols = p.shape
        idx, vals = p.flat()
        want = r * (rows + cols)
        pad = want - idx.numel()
        if pad:
            free = torch.ones(p.numel, dtype=torch.bool)
            free[idx] = False
            idx = torch.cat([idx, free.nonzero().flatten()[:pad]])
            vals = torch.cat([vals, torch.zeros(pad, dtype=torch.float64)])
            padded += pad
        out_tensors[f"{PREFIX}{mod_name}.shira_weight"] = vals.to(torch.float32)
        out_tensors[f"{PREFIX}{mod_name}.shira_indices"] = torch.stack([idx // cols, idx % cols]).to(torch.int32)
    carried = 0
    for mod_name in sorted(whole):
        for leaf, _ in modules[mod_name].named_parameters(recurse=False):
            key = f"{mod_name}.{leaf}"
            if key in delta.new:
                value = delta.new[key]
            else:
                bname = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
                t, _ = base.read(bname)
                p = delta.params.get(bname)
                value = p.add_to(t) if p is not None else t
                value = value.to(t.dtype)
            out_tensors[f"{PREFIX}{key}"] = value.contiguous()
            carried += value.numel()
    config = {
        "peft_type": "SHIRA",
        "task_type": _task_type(arch),
        "r": r,
        "mask_type": "random",
        "random_seed": None,
        "target_modules": sorted(shira),
        "modules_to_save": sorted(whole) or None,
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": delta.config["base"].get("name_or_path"),
        "revision": None,
    }
    summary = {
        "out": str(out),
        "r": r,
        "shira_modules": len(shira),
        "shira_entries": sum(p.entries for _, p in shira.values()),
        "padding_entries": padded,
        "modules_to_save": sorted(whole),
        "modules_to_save_entries": carried,
        "file_bytes": 0,
    }
    from id3_ds.delta.card import write_card

    with staged_dir(out, "replace" if overwrite else "error") as tmp:
        save_file(out_tensors, str(tmp / ADAPTER_FILE))
        write_json_atomic(tmp / ADAPTER_CONFIG, config)
        write_card(tmp, delta, library="peft", method="SHiRA (exported from an id3-ds delta)")
    summary["file_bytes"] = (out / ADAPTER_FILE).stat().st_size
    return summary


def import_peft(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write an id3 delta from a PEFT SHiRA adapter folder trained on `base_dir`."""
    from id3_ds.delta.export import exact_delta

    root = Path(adapter_dir)
    try:
        cfg = json.loads((root / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        raise ID3Error(f"{root} has no readable {ADAPTER_CONFIG}: pass a PEFT adapter folder") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "SHIRA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ID3Error(
            f"{root} is a PEFT {kind} adapter, not SHiRA: import-peft reads sparse SHiRA adapters "
            "(merge other adapters with PEFT's merge_and_unload)"
        )
    if cfg.get("fan_in_fan_out"):
        raise ID3Error(f"{root}: SHiRA with fan_in_fan_out (Conv1D layers) is not supported by import-peft")
    if not (root / ADAPTER_FILE).is_file():
        raise ID3Error(f"{root} has no {ADAPTER_FILE}: the adapter is incomplete (only safetensors is read)")
    state = load_file(str(root / ADAPTER_FILE))
    base = BaseModel.open(base_dir)

    def base_name(key: str) -> str:
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        name = name.replace(".modules_to_save.default.", ".")
        if name in base.tensors:
            return name
        tail = name.split(".", 1)[-1]  # a task model's prefix (bert.) over a base model
        if tail in base.tensors:
            return tail
        raise ID3Error(
            f"adapter tensor {key} has no counterpart {name} in base {base.root}: pass the base model the "
            "adapter was trained on (a fresh head the base lacks cannot be imported)"
        )

    params: dict[str, ParamDelta] = {}
    prints: dict[str, dict] = {}
    for key in sorted(state):
        if not key.endswith(".shira_weight"):
            continue
        module = key[: -len(".shira_weight")]
        ikey = f"{module}.shira_indices"
        if ikey not in state:
            raise ID3Error(f"{root}/{ADAPTER_FILE} has {key} but no {ikey}: the adapter is corrupt")
        name = base_name(f"{module}.weight")
        info = base.tensors[name].info
        rows, cols = info.shape
        ij = state[ikey].to(torch.int64)
        vals = state[key].to(torch.float64).reshape(-1)
        inside = ij.shape == (2, vals.numel()) and not bool((ij < 0).any())
        if not inside or bool((ij[0] >= rows).any() or (ij[1] >= cols).any()):
            raise ID3Error(f"{root}: {ikey} does not address a [{rows}, {cols}] weight: the adapter is corrupt")
        flat, inv = torch.unique(ij[0] * cols + ij[1], sorted=True, return_inverse=True)
        summed = torch.zeros(flat.numel(), dtype=torch.float64).index_add_(0, inv, vals)
        keep = summed != 0
        if not bool(keep.any()):
            continue
        params[name] = ParamDelta(tuple(info.shape), info.dtype, summed[keep].to(torch.float32), flat[keep])
    for key in sorted(state):
        if key.endswith((".shira_weight", ".shira_indices")):
            continue
        name = base_name(key)
        t, _ = base.read(name)
        value = state[key]
        if tuple(value.shape) != tuple(t.shape):
            raise ID3Error(f"adapter tensor {key} has shape {list(value.shape)} but base {name} {list(t.shape)}")
        if name in params:
            raise ID3Error(f"{root}: {name} is both SHiRA-adapted and in modules_to_save: the adapter is corrupt")
        if torch.equal(value.to(t.dtype), t):
            continue
        d, fix_at, fix = exact_delta(value.reshape(-1).float(), t.reshape(-1).float())
        p = ParamDelta(tuple(t.shape), base.tensors[name].info.dtype, d.reshape(t.shape))
        if fix_at.numel() and dtype == "fp32":
            p.fix_at, p.fix = fix_at, fix
        params[name] = p
    for name in params:
        t = base.tensors[name].info
        prints[name] = {"shape": list(t.shape), "dtype": t.dtype, "sha256": base.read(name)[1]}
    info = {
        "name_or_path": cfg.get("base_model_name_or_path") or str(base_dir),
        "path": str(base.root.resolve()),
        "numel": base.numel,
    }
    total = sum(p.entries for p in params.values())
    id3 = {"budget": total, "steps": None, "eps": None, "exp": None, "imported": {"from": "peft", "type": "SHIRA"}}
    return write_delta(
        out,
        params,
        base=info,
        id3=id3,
        dtype=dtype,
        fingerprint_tensors=prints,
        overwrite=overwrite,
        protect=[base.root, root],
    )
