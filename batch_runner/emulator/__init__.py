"""A ComfyUI-compatible server for tests, benchmarks, the demo and dry runs.

It speaks the protocol recorded in ../shared/comfyui-protocol (routes, validation errors,
websocket message order and routing, caching, history), runs the Wan2.2 image-to-video
graph with emulated GPU time, writes real H.264 MP4 files, and injects seeded faults.
"""

from __future__ import annotations

from batch_runner.emulator.config import WAN22_MODELS, EmulatorConfig, Faults
from batch_runner.emulator.instance import CRASH_EXIT_STATUS, Emulator, serve

__all__ = ["CRASH_EXIT_STATUS", "WAN22_MODELS", "Emulator", "EmulatorConfig", "Faults", "serve"]
