"""Knobs of the emulator: what it serves, how fast it runs and which faults it injects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# File names of the Wan2.2 I2V A14B model card; the loaders only check names, as the real
# server does at validation time.
WAN22_MODELS: Mapping[str, Sequence[str]] = {
    "diffusion_models": (
        "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    ),
    "text_encoders": ("umt5_xxl_fp8_e4m3fn_scaled.safetensors",),
    "vae": ("wan_2.1_vae.safetensors",),
    "loras": (),
}

# The real server's default --max-upload-size (100 MB).
DEFAULT_MAX_UPLOAD_SIZE = 104_857_600


@dataclass(frozen=True)
class Faults:
    """Injected faults; every random decision is drawn from generators seeded with `seed`.

    Each knob has its own generator, so switching one knob on does not change the
    decisions of another.
    """

    seed: int = 0
    # Fraction of HTTP requests answered 500 or 503 before they are handled.
    http_5xx_rate: float = 0.0
    # Fraction of HTTP requests that are handled (a prompt is queued, a file stored) but whose
    # connection is closed before the answer is sent: the "did my POST land?" case.
    drop_response_rate: float = 0.0
    # Added before every HTTP answer.
    latency_ms: float = 0.0
    # Abruptly drop each websocket (no close frame) after this many frames were sent to it.
    ws_drop_after_frames: int | None = None
    # Per-frame chance to drop a websocket abruptly.
    ws_drop_rate: float = 0.0
    # Chance that a new websocket connection is accepted but never receives anything after
    # the connect `status` (what the same-clientId close race does to a client).
    ws_deaf_rate: float = 0.0
    # Chance that a prompt fails with torch.OutOfMemoryError at its first sampler step (at
    # its output node when no sampler runs).
    execution_error_rate: float = 0.0
    # Chance that a /view body is cut short: Content-Length announces the full size, then
    # the connection closes.
    truncate_view_rate: float = 0.0
    # After this many finished prompts: os._exit in a standalone process (see
    # EmulatorConfig.exit_on_crash), otherwise a hard stop until Emulator.restart().
    crash_after_prompts: int | None = None
    # Send one binary preview frame per sampler step (type 1, or type 4 to sockets that
    # announced supports_preview_metadata), as a server started with --preview-method auto.
    preview_frames: bool = False
    # Size of each preview frame in bytes; large values exercise clients' frame size limits.
    preview_bytes: int = 120_000


@dataclass(frozen=True)
class EmulatorConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: int = 0
    # Emulated GPU time per sampler (or upscaler) step, before dividing by `speed`.
    step_ms: float = 5.0
    # 2.0 runs twice as fast.
    speed: float = 1.0
    # Videos are scaled down to this longest side (same aspect, even sides) to keep runs fast.
    video_max_side: int = 128
    # Model file names per folder; None means the Wan2.2 card's files (WAN22_MODELS).
    models: Mapping[str, Sequence[str]] | None = None
    # Holds input/, output/ and temp/; a temporary directory (removed on exit) when None.
    data_dir: Path | None = None
    faults: Faults = field(default_factory=Faults)
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
    # The real server keeps at most this many history entries, dropping the oldest.
    max_history: int = 10_000
    # Model files are garbage placeholders under the right names: validation passes and the
    # first loader that runs fails, as in trace 05 (the default "loads" names only).
    placeholder_models: bool = False
    # Behave as if behind a reverse proxy that requires `Authorization: Bearer <token>`
    # (ComfyUI itself ignores the header, trace 13); None accepts every request.
    require_token: str | None = None
    # Set only when the emulator is the whole process (the CLI): a crash fault then ends
    # the process with os._exit instead of stopping the in-process server.
    exit_on_crash: bool = False

    @property
    def model_files(self) -> Mapping[str, Sequence[str]]:
        return WAN22_MODELS if self.models is None else self.models

    @property
    def step_seconds(self) -> float:
        return self.step_ms / 1000.0 / self.speed
