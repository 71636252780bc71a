"""`id3-ds` command line. Each command is a thin wrapper over the Python API; errors print one line."""

from __future__ import annotations

import typer

app = typer.Typer(help="ID3 sparse fine-tuning on DeepSpeed: export, merge and inspect sparse deltas.")


@app.command()
def version() -> None:
    """Print the id3-ds version."""
    from id3_ds import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
