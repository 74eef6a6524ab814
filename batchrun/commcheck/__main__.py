"""``python -m batchrun.commcheck ...`` (works without the rest of batchrun)."""

from batchrun.commcheck.cli import app

__all__: list[str] = []

if __name__ == "__main__":
    app(prog_name="python -m batchrun.commcheck")
