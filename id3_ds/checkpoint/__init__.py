"""Training checkpoints: where each part lives (`layout`), writing one (`saving`), continuing from one (`resuming`),
and whether this run may continue it at all (`compat`).

Export and the CLI read checkpoints through `layout` alone; the trainer saves and resumes through the
other two, which reach DeepSpeed only through id3_ds.integration.
"""

from id3_ds.checkpoint.compat import already_finished, check_resume
from id3_ds.checkpoint.layout import (
    COMPLETE,
    DS_TAG,
    LORA_FILE,
    UNIVERSAL,
    checkpoint_dir,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    mark_complete,
    read_complete,
    read_id3_state,
    read_lora_state,
    shard_path,
    write_id3_shard,
    write_lora_state,
)
from id3_ds.checkpoint.resuming import global_batch_note, resume
from id3_ds.checkpoint.saving import check_output_dir, classification_info, save, save_final_model

__all__ = [
    "already_finished",
    "COMPLETE",
    "DS_TAG",
    "LORA_FILE",
    "UNIVERSAL",
    "check_output_dir",
    "check_resume",
    "checkpoint_dir",
    "classification_info",
    "global_batch_note",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "mark_complete",
    "read_complete",
    "read_id3_state",
    "read_lora_state",
    "resume",
    "save",
    "save_final_model",
    "shard_path",
    "write_id3_shard",
    "write_lora_state",
]
