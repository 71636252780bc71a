"""Layout of a training checkpoint, and which one is the latest complete.

    OUTPUT_DIR/checkpoint-00000100/
        ds/state/                             DeepSpeed engine state (optimizer, weights), per rank
        ds_universal/state/                   made on a resume that needs it: DeepSpeed's universal
                                              checkpoint of ds/, loadable by any world size
        id3/shard-00000-of-00002.safetensors  each rank's chosen entries: global flat indices, step
                                              chosen, base value, current value (see MaskState)
        id3/trainer_state.json                sparse-state runs (id3.state: sparse) only, which have no
                                              ds/: the LR schedule's state (rank 0, atomic); the shards
                                              then also carry each chosen entry's Adam moments
        id3/lora.safetensors                  LoRA runs only: every LoRA A/B matrix, whole (ZeRO-3
                                              gathered) and fp32, plus the LoRA settings in its metadata
        COMPLETE                              JSON, written last and atomically by rank 0 after every
                                              rank finished: a checkpoint without it is ignored; it
                                              records the run config and the settings a resume compares
                                              (compat.py); a classification run (no LoRA) also its head,
                                              base prefix and config keys, for export

The ID3 shards alone make a sparse delta (value - base), so `export-delta` never needs DeepSpeed's
pickled files nor the processes that wrote them, and any world size can resume from them. A LoRA run's
delta also needs LoRA A's random init, which no base model holds: `id3/lora.safetensors` gives it (the
current A with each chosen entry put back to its base value from the shards; unchosen entries never move).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from id3_ds.algorithm.mask import MaskState
from id3_ds.checkpoint.mask_file import load_mask, save_mask
from id3_ds.errors import ID3Error
from id3_ds.files.atomic import write_json_atomic
from id3_ds.files.safetensors_io import load_tensors, save_tensors

COMPLETE = "COMPLETE"
DS_TAG = "state"  # DeepSpeed's tag folder under ds/ and ds_universal/
UNIVERSAL = "ds_universal"
LORA_FILE = "lora.safetensors"
TRAINER_STATE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d{8})$")
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:08d}"


def shard_path(ckpt: str | Path, rank: int, world_size: int) -> Path:
    return Path(ckpt) / "id3" / f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def write_id3_shard(ckpt: str | Path, rank: int, world_size: int, state: MaskState, meta: dict) -> None:
    path = shard_path(ckpt, rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_mask(state, path, meta={**meta, "rank": rank, "world_size": world_size})


def write_trainer_state(ckpt: str | Path, state: dict) -> None:
    """A sparse-state run's small JSON state (LR schedule), written atomically by rank 0."""
    path = Path(ckpt) / "id3" / TRAINER_STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)


def read_trainer_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "id3" / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ID3Error(
            f"{ckpt} lacks id3/{TRAINER_STATE}: it is not a sparse-state (id3.state: sparse) checkpoint"
        ) from None
    except json.JSONDecodeError:
        raise ID3Error(f"{path} is corrupt; use an earlier checkpoint-* directory") from None


def write_lora_state(ckpt: str | Path, tensors: dict[str, torch.Tensor], settings: dict) -> Path:
    """The run's LoRA matrices (name -> whole fp32 tensor) and settings, written atomically by one rank."""
    path = Path(ckpt) / "id3" / LORA_FILE
    data = {k: v.detach().to(torch.float32) for k, v in tensors.items()}
    save_tensors(path, data, {"lora": json.dumps(settings, sort_keys=True)})
    return path


def read_lora_state(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(LoRA matrices, settings) of a LoRA run's checkpoint, or None when it has no id3/lora.safetensors."""
    path = Path(ckpt) / "id3" / LORA_FILE
    if not path.is_file():
        return None
    tensors, metadata = load_tensors(path, "checkpoint LoRA file")
    try:
        settings = json.loads(metadata.get("lora", "null"))
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise ID3Error(f"{path} lacks its LoRA settings metadata: the checkpoint is corrupt")
    return tensors, settings


def mark_complete(ckpt: str | Path, info: dict) -> None:
    """Call once every rank has written its part: from then on the checkpoint counts."""
    write_json_atomic(Path(ckpt) / COMPLETE, info)


def is_complete(ckpt: str | Path) -> bool:
    return (Path(ckpt) / COMPLETE).is_file()


def read_complete(ckpt: str | Path) -> dict:
    try:
        return json.loads((Path(ckpt) / COMPLETE).read_text())
    except FileNotFoundError:
        raise ID3Error(
            f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker): the run stopped while "
            "writing it; use an earlier checkpoint-* directory"
        ) from None
    except json.JSONDecodeError:
        raise ID3Error(f"{ckpt}/{COMPLETE} is corrupt; use an earlier checkpoint-* directory") from None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_id3_state(ckpt: str | Path) -> tuple[MaskState, dict]:
    """The whole model's mask (every rank's shard joined) and the shards' common meta."""
    ckpt = Path(ckpt)
    read_complete(ckpt)
    shards = sorted((ckpt / "id3").glob("shard-*.safetensors")) if (ckpt / "id3").is_dir() else []
    parsed = [(m, p) for p in shards if (m := _SHARD.match(p.name))]
    if not parsed:
        raise ID3Error(f"{ckpt} has no id3/shard-*.safetensors files: it is not an id3-ds checkpoint")
    worlds = {int(m.group(2)) for m, _ in parsed}
    if len(worlds) != 1:
        raise ID3Error(f"{ckpt}/id3 mixes shards of world sizes {sorted(worlds)}: the checkpoint is corrupt")
    world = worlds.pop()
    ranks = sorted(int(m.group(1)) for m, _ in parsed)
    if ranks != list(range(world)):
        raise ID3Error(f"{ckpt}/id3 has shards {ranks} of a world of {world}: some are missing")
    states, metas = [], []
    for _, p in parsed:
        st, meta = load_mask(p)
        states.append(st)
        metas.append(meta)
    common = {k: v for k, v in metas[0].items() if k != "rank"}
    for m in metas[1:]:
        if {k: v for k, v in m.items() if k != "rank"} != common:
            raise ID3Error(f"{ckpt}/id3 shards disagree on their step or settings: the checkpoint is corrupt")
    return MaskState.union(states), common
