"""Training checkpoint -> delta, from the ID3 shards alone.

Every rank's `id3/shard-*.safetensors` carries its chosen entries' global indices, base and current fp32
values, so the delta (value - base) needs neither DeepSpeed's files nor the processes that wrote them, works
for any ZeRO stage and world size, and costs O(B) memory plus one base tensor at a time (read to check that
the checkpoint was trained from this base, and to fingerprint it).

A LoRA run (PEFT names, `base_model.model.<module>.lora_A.default.weight`) also needs LoRA A's random
init, which the base does not hold: the checkpoint's `id3/lora.safetensors` has every A and B whole, so
A's init is that A with each chosen entry put back to its base value from the shards (unchosen entries
never move), and B must be zero outside its chosen entries (its init is zero). Modules whose B has no
chosen entry fold to nothing and are left out.

A classification run (no LoRA) records its head, base prefix and config keys in COMPLETE: base weights
map to the base's names (without the task model's `bert.`-like prefix), and the fully trained head goes
into the delta whole, as new tensors, with the config.json keys that declare it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from id3_ds.algorithm.mask import ParamMask
from id3_ds.checkpoint import LORA_FILE, is_complete, latest_checkpoint, read_complete, read_id3_state, read_lora_state
from id3_ds.delta.base import BaseModel
from id3_ds.delta.format import INDEX_FORMS, LoraDelta, LoraModule, ParamDelta, write_delta
from id3_ds.delta.lora import split_lora_name
from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st

PEFT_PREFIX = "base_model.model."
# LoRA variants whose fold is not W + (alpha / r) * B @ A: refused rather than merged wrongly
_UNSUPPORTED = ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint-* directory as given, or the latest complete one under an output directory."""
    p = Path(path)
    if not p.is_dir():
        raise ID3Error(f"checkpoint {p} does not exist: pass a checkpoint-* directory or the run's output directory")
    if is_complete(p) or (p / "id3").is_dir():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ID3Error(f"{p} holds no complete checkpoint-* directory: train until a checkpoint is saved")
    return latest


def exact_delta(value: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, fix_at, fix): fp32 d = value - base, plus fp32 fix-ups where base + d misses value.

    fp32 subtraction rounds when value and base differ in exponent; for an entry that crossed zero or
    shrank below half its start, no fp32 d at all gives fl(base + d) == value (ID3 favours small weights,
    so a few percent of entries do this). For those, fix = (value - base) - d, exact in fp64 and
    representable in fp32, makes base + (d + fix) == value exactly.
    """
    value, base = value.to(torch.float32), base.to(torch.float32)
    d = value - base
    miss = ((base + d) != value).nonzero().flatten()
    fix = (value[miss].double() - base[miss].double() - d[miss].double()).to(torch.float32)
    ok = (base[miss].double() + d[miss].double() + fix.double()).to(torch.float32) == value[miss]
    if not bool(ok.all()):  # not expected for finite fp32 inputs; never write a delta that cannot round-trip
        raise ID3Error("an update has no exact fp32 + fix-up form; export with --dtype bf16, or report it")
    return d, miss, fix


def export_delta(
    checkpoint: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    force: bool = False,
    overwrite: bool = False,
    entries: int | float | None = None,
    index: str = "gaps",
    keep_steps: bool = False,
) -> Path:
    """Write the delta of a training checkpoint against its base model directory; returns `out`.

    `entries` (an int K, or a fraction in (0, 1]) keeps only the K earliest-chosen entries (see `truncate`).
    `index`: "gaps" (compact, format version 3) or "flat" (int32 positions, readable since version 1).
    `keep_steps` stores the step each entry was chosen (2 bytes an entry), so the delta file itself can be
    cut later (`id3_ds.delta.cut`).
    """
    if index not in INDEX_FORMS:  # before any reading: a typo costs nothing
        raise ID3Error(f"--index {index!r} is not an index form; use one of {', '.join(INDEX_FORMS)}")
    ckpt = resolve_checkpoint(checkpoint)
    info = read_complete(ckpt)
    state, meta = read_id3_state(ckpt)
    base = BaseModel.open(base_dir)
    lora_names = [name for name in state.params if split_lora_name(name)]
    cls = _classification(ckpt, info, lora_names)
    head = cls["head"] if cls else {}
    prefix = cls["base_model_prefix"] if cls else ""
    new = _new_tensors(ckpt, state, head, base) if cls else {}
    plain = {
        name: _base_name(name, base, prefix) for name in state.params if name not in lora_names and name not in head
    }
    cut = None
    if entries is not None:
        if lora_names:
            raise ID3Error(f"checkpoint {ckpt} trains LoRA matrices: --entries cuts plain ID3 deltas only")
        cut = truncate(state, sorted(plain), entries)
    for name, bname in plain.items():  # cheap header checks first: fail before reading any weight
        pm = state.params[name]
        if cls is None and bname not in base.tensors and not name.startswith(PEFT_PREFIX):
            raise _old_classification(ckpt, name, base)
        t = base.get(bname)
        if t.info.shape != tuple(pm.shape):
            raise ID3Error(
                f"checkpoint {ckpt} has {name} with shape {list(pm.shape)} but the base has {list(t.info.shape)}: "
                "pass the base model the run was trained from"
            )
        if t.info.dtype not in st.FLOAT_DTYPES:
            raise ID3Error(f"base tensor {bname} is {t.info.dtype}, not floating point: it cannot carry a delta")
        if pm.value is None:
            raise ID3Error(f"checkpoint {ckpt} has no current values for {name}: it was not written for export")
    params: dict[str, ParamDelta] = {}
    prints: dict[str, dict] = {}
    fixes = 0
    trained_in = (info.get("model") or {}).get("dtype") if isinstance(info.get("model"), dict) else None
    train_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained_in)
    model_info = info.get("model") if isinstance(info.get("model"), dict) else {}
    quantized, kind = set(model_info.get("quantized") or []), model_info.get("quantization")
    for name in sorted(plain):
        pm, bname = state.params[name], plain[name]
        if pm.indices.numel() == 0:  # a parameter the mask never reached: nothing to ship
            continue
        tensor, sha = base.read(bname)
        t = base.tensors[bname].info
        prints[bname] = {"shape": list(t.shape), "dtype": t.dtype, "sha256": sha}
        on_disk = tensor.reshape(-1)[pm.indices].to(torch.float32)
        # a run may train in a lower precision than the base file (bf16 on an fp32 base): its starting
        # weights are the base rounded to that dtype
        as_trained = on_disk.to(train_dtype).to(torch.float32) if train_dtype is not None else on_disk
        if name in quantized:  # a quantized base (models/quantized.py): training started from dequantize(quantize(w))
            from id3_ds.models.quantized import dequantized_reference

            seen = dequantized_reference(tensor.to(train_dtype or torch.float32), kind)
            as_trained = seen.reshape(-1)[pm.indices].to(torch.float32)
            del seen
        differs = int((as_trained != pm.base).sum())
        if differs and not force:
            raise ID3Error(
                f"{differs} starting weights of {name} in checkpoint {ckpt} differ from base {base.root}: the run "
                "was trained from another base; pass that one (or --force to export against this base anyway)"
            )
        del tensor
        # the delta is against the base as stored, so base + delta gives the trained value exactly (for a
        # quantized run too: merged, unchosen entries keep the unquantized base, not what training saw)
        d, fix_at, fix = exact_delta(pm.value, on_disk)
        fixes += fix_at.numel()
        steps = pm.chosen_at.to(torch.int32) if keep_steps else None
        params[bname] = _param(t.shape, t.dtype, pm.indices, d, fix_at, fix, dtype, steps)
    lora = None
    if lora_names:
        lora, lora_fixes = _lora_delta(ckpt, state, base, train_dtype, dtype, prints)
        fixes += lora_fixes
        clash = sorted(set(lora.modules) & set(params))
        if clash:
            raise ID3Error(
                f"checkpoint {ckpt} trains {clash[0]} both directly and through LoRA: a delta cannot carry both; "
                "leave the LoRA-wrapped weights out of id3.fully_trainable"
            )
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    id3 = {k: v for k, v in (info.get("id3") or {}).items() if isinstance(k, str)}
    id3.update(budget=meta.get("budget"), steps=meta.get("steps"), step=meta.get("step", info.get("step")))
    id3.setdefault("eps", None)
    id3.setdefault("exp", None)
    run_cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    spec = run_cfg.get("model", {}).get("name_or_path") if isinstance(run_cfg.get("model"), dict) else None
    base_info = {
        **({"spec": spec} if isinstance(spec, str) else {}),
        "name_or_path": model.get("name_or_path") or str(base_dir),
        "path": str(base.root.resolve()),
        "numel": base.numel,
    }
    stats = {"world_size": meta.get("world_size"), "checkpoint": ckpt.name, "fixups": fixes if dtype == "fp32" else 0}
    id3["export"] = stats
    if cut is not None:
        id3["export"]["truncated"] = cut
    id3.update(_provenance(ckpt, info))
    if lora is not None and not lora.modules:
        lora = None  # no B entry anywhere: the LoRA part folds to nothing
    return write_delta(
        out,
        params,
        base=base_info,
        id3=id3,
        dtype=dtype,
        fingerprint_tensors=prints,
        overwrite=overwrite,
        protect=[base.root, ckpt],
        lora=lora,
        new=new,
        config_updates=cls["config_updates"] if cls else None,
        index=index,
    )


def earliest(steps: list[torch.Tensor], entries: int | float) -> tuple[list[torch.Tensor], dict]:
    """Per tensor (in the given order), a mask of the K earliest-chosen entries; and {kept, of, last_step}.

    Order: the step each entry was chosen, then the tensor's place in `steps`, then its position: inside one
    step the scores are not recorded, so a cut inside a step keeps a deterministic part of it.
    """
    total = sum(int(s.numel()) for s in steps)
    if isinstance(entries, float):
        if not 0.0 < entries <= 1.0:
            raise ID3Error(f"--entries {entries}: a fraction must be in (0, 1], or give a whole number of entries")
        k = round(entries * total)
    else:
        if entries < 1:
            raise ID3Error(f"--entries {entries}: keep at least one entry")
        k = min(int(entries), total)
    if total == 0:
        return [torch.zeros(0, dtype=torch.bool) for _ in steps], {"kept": 0, "of": 0, "last_step": None}
    step = torch.cat([s.to(torch.int64) for s in steps])
    which = torch.cat([torch.full((s.numel(),), i, dtype=torch.int64) for i, s in enumerate(steps)])
    pos = torch.cat([torch.arange(s.numel()) for s in steps])
    order = torch.from_numpy(np.lexsort((pos.numpy(), which.numpy(), step.numpy())))
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:k]] = True
    last = int(step[order[k - 1]]) if k else None
    return list(keep.split([int(s.numel()) for s in steps])), {"kept": k, "of": total, "last_step": last}


def truncate(state, names: list[str], entries: int | float) -> dict:
    """Keep, in `state`, only the K earliest-chosen entries of `names`; returns what was cut.

    ID3's mask only grows, so the entries chosen by step s are exactly the run's state at budget B(s): the
    K earliest are the delta a shorter unmasking would have chosen (with the values the full run trained).
    """
    masks, info = earliest([state.params[n].chosen_at for n in names], entries)
    for n, m in zip(names, masks, strict=True):
        pm = state.params[n]
        opt = {f: (None if getattr(pm, f) is None else getattr(pm, f)[m]) for f in ("value", "exp_avg", "exp_avg_sq")}
        state.params[n] = ParamMask(pm.shape, pm.indices[m], pm.chosen_at[m], pm.base[m], **opt)
    return info


def _provenance(ckpt: Path, info: dict) -> dict:
    """The run's data file and its latest eval metrics (for the model card): best effort, never an error."""
    out: dict = {}
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    path = data.get("path")
    if isinstance(path, str):  # a package spec as written; a file by its name (no local directories)
        out["data"] = path if ":" in path or "/" not in path else Path(path).name
    log = ckpt.parent / "log.jsonl"
    step = info.get("step")
    try:
        lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if isinstance(step, int) and isinstance(rec.get("step"), int) and rec["step"] > step:
            continue
        evals = {k: v for k, v in rec.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if evals:
            out["eval"] = {**evals, "step": rec.get("step")}
    return out


def _classification(ckpt: Path, info: dict, lora_names: list[str]) -> dict | None:
    """A classification run's record in COMPLETE (architecture, base prefix, head, config updates), or None."""
    cls = info.get("classification")
    if cls is None:
        return None
    if lora_names:
        raise ID3Error(
            f"checkpoint {ckpt} trains LoRA over a classification model: its fresh head is PEFT's trainable copy, "
            "which a delta cannot carry; keep the model with train.save_final_model=true"
        )
    ok = isinstance(cls, dict) and isinstance(cls.get("head"), dict) and isinstance(cls.get("config_updates"), dict)
    if not ok or not isinstance(cls.get("base_model_prefix"), str):
        raise ID3Error(f"checkpoint {ckpt}/COMPLETE has a malformed classification record: the checkpoint is corrupt")
    return cls


def _old_classification(ckpt: Path, name: str, base: BaseModel) -> ID3Error:
    return ID3Error(
        f"checkpoint {ckpt} has {name}, which base {base.root} lacks: if it is a classification run, it was written "
        "by an id3-ds that did not record its head (no 'classification' in COMPLETE), so re-run it with this id3-ds "
        "or keep train.save_final_model=true; otherwise pass the base model the run was trained from"
    )


def _new_tensors(ckpt: Path, state, head: dict, base: BaseModel) -> dict[str, torch.Tensor]:
    """The fresh head's final values, whole: every head parameter must be fully trainable (all entries chosen),
    since its random init is in no base and the shards hold only chosen entries."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(head.items()):
        if name in base.tensors:
            raise ID3Error(
                f"checkpoint {ckpt}: the head parameter {name} also exists in base {base.root}: a delta cannot tell "
                "a fresh head from that base weight; pass the base model (e.g. a BertModel) the run started from"
            )
        pm = state.params.get(name)
        if pm is None or pm.value is None or pm.indices.numel() != math.prod(shape) or list(pm.shape) != shape:
            raise ID3Error(
                f"checkpoint {ckpt}: the fresh head parameter {name} was not fully trained, so its random init is "
                f'lost and no delta can rebuild it: add it to id3.fully_trainable (e.g. ["{name.split(".")[0]}.*"])'
            )
        full = torch.empty(math.prod(shape), dtype=torch.float32)
        full[pm.indices.to(torch.int64)] = pm.value.to(torch.float32)
        out[name] = full.reshape(shape)
    return out


def _param(shape, base_dtype: str, indices, d, fix_at, fix, dtype: str, steps=None) -> ParamDelta:
    """A ParamDelta, dense when every entry is chosen (a fully trainable group: no indices needed)."""
    dense = indices.numel() == math.prod(shape)
    p = ParamDelta(tuple(shape), base_dtype, d.reshape(shape) if dense else d, None if dense else indices)
    if fix_at.numel() and dtype == "fp32":
        p.fix_at, p.fix = fix_at, fix
    p.steps = steps
    return p


def _base_name(name: str, base: BaseModel, prefix: str = "") -> str:
    """The base's name of a checkpoint parameter: itself, without the task model's base prefix (`bert.` of a
    BertForSequenceClassification over a BertModel base), or a PEFT-wrapped name unwrapped."""
    if name in base.tensors:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in base.tensors:
        return name[len(prefix) + 1 :]
    if not name.startswith(PEFT_PREFIX):
        return name
    plain = name[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
    copy = ".modules_to_save.default."
    if copy in plain:
        plain = plain.replace(copy, ".")
        if plain not in base.tensors:
            raise ID3Error(
                f"{name} is PEFT's trainable copy of {plain}, which the base does not hold (a fresh classification "
                "head): a delta cannot carry it; keep the model with train.save_final_model=true"
            )
    return plain


def _lora_delta(ckpt: Path, state, base: BaseModel, train_dtype, dtype: str, prints: dict) -> tuple[LoraDelta, int]:
    """The LoRA part of a checkpoint: per adapted base weight, A's init and A's and B's sparse entries."""
    found = read_lora_state(ckpt)
    if found is None:
        raise ID3Error(
            f"checkpoint {ckpt} trained LoRA matrices but has no id3/{LORA_FILE} (their init and settings): it "
            "was written by an id3-ds without LoRA export; use the adapter of train.save_final_model=true instead"
        )
    dense, settings = found
    bad = [k for k in _UNSUPPORTED if settings.get(k)]
    if bad:
        raise ID3Error(f"checkpoint {ckpt}: LoRA with {bad[0]} is not W + (alpha/r)·B·A; such a delta is not supported")
    rank, alpha = settings.get("rank"), settings.get("alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ID3Error(f"checkpoint {ckpt}/id3/{LORA_FILE} has no valid LoRA rank/alpha: the checkpoint is corrupt")
    pairs: dict[str, dict[str, str]] = {}
    for name in list(dense) + [n for n in state.params if split_lora_name(n)]:
        weight, which = split_lora_name(name) or (None, None)
        if weight is not None:
            pairs.setdefault(weight, {})[which] = name
    lora = LoraDelta(rank, float(alpha), settings.get("target_modules"))
    fixes = 0
    dts = (torch.int64, torch.int32, torch.float32, torch.float32)
    empty = ParamMask((0,), *(torch.empty(0, dtype=dt) for dt in dts))
    for weight in sorted(pairs):
        a_name, b_name = pairs[weight].get("A"), pairs[weight].get("B")
        if a_name not in dense or b_name not in dense:
            raise ID3Error(
                f"checkpoint {ckpt}/id3/{LORA_FILE} lacks LoRA {'A' if a_name not in dense else 'B'} of {weight}: "
                "the checkpoint is corrupt"
            )
        pm_b = state.params.get(b_name, empty)
        if pm_b.indices.numel() == 0:
            continue  # B stays zero: this module folds to nothing
        pm_a = state.params.get(a_name, empty)
        a_now, b_now = dense[a_name].to(torch.float32), dense[b_name].to(torch.float32)
        t = base.get(weight)
        want = ((rank, t.info.shape[1]), (t.info.shape[0], rank)) if len(t.info.shape) == 2 else None
        if want is None or tuple(a_now.shape) != want[0] or tuple(b_now.shape) != want[1]:
            raise ID3Error(
                f"LoRA A {list(a_now.shape)} / B {list(b_now.shape)} of checkpoint {ckpt} do not fit base weight "
                f"{weight} {list(t.info.shape)} at rank {rank}: pass the base model the run was trained from"
            )
        if t.info.dtype not in st.FLOAT_DTYPES:
            raise ID3Error(f"base tensor {weight} is {t.info.dtype}, not floating point: it cannot carry a delta")
        for pm, now, n in ((pm_a, a_now, a_name), (pm_b, b_now, b_name)):
            if pm.indices.numel() == 0:
                continue
            ok = tuple(pm.shape) == tuple(now.shape) and pm.value is not None
            value = pm.value if train_dtype is None or not ok else pm.value.to(train_dtype).float()
            if not ok or not torch.equal(now.reshape(-1)[pm.indices], value):
                raise ID3Error(f"checkpoint {ckpt}: the id3 shards and {LORA_FILE} disagree on {n}: it is corrupt")
        b_rest = b_now.reshape(-1).clone()
        b_rest[pm_b.indices] = 0
        if bool((pm_b.base != 0).any()) or bool((b_rest != 0).any()):
            raise ID3Error(
                f"checkpoint {ckpt}: LoRA B of {weight} did not start at zero (a non-default init_lora_weights?); "
                "its delta is not supported"
            )
        init = a_now.reshape(-1).clone()
        init[pm_a.indices] = pm_a.base  # unchosen entries never moved: the rest of A is its init
        d_a, fix_at, fix = exact_delta(pm_a.base if pm_a.value is None else pm_a.value, pm_a.base)
        fixes += fix_at.numel()
        zero = torch.empty(0, dtype=torch.int64)
        a = _param(want[0], "F32", pm_a.indices, d_a, fix_at, fix, dtype)
        b = _param(want[1], "F32", pm_b.indices, pm_b.value.to(torch.float32), zero, zero, dtype)
        lora.modules[weight] = LoraModule(weight, a_name, b_name, init.reshape(want[0]), a, b)
        _, sha = base.read(weight)
        prints[weight] = {"shape": list(t.info.shape), "dtype": t.info.dtype, "sha256": sha}
    return lora, fixes
