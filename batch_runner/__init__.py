"""batch_runner: Wan2.2 image-to-video batches on ComfyUI servers, resumable and exactly-once."""

__version__ = "0.1.0"

__all__ = ["__version__"]
