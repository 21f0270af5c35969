"""The batch-runner command line."""

from __future__ import annotations

import click

from batch_runner import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batch-runner")
def main() -> None:
    """Turn (image, prompt) pairs into Wan2.2 image-to-video clips on ComfyUI servers."""
