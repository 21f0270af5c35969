"""Run an emulator as its own process: `python -m batch_runner.emulator [--config JSON]`.

Prints the URL on stdout once it listens. The JSON object holds EmulatorConfig fields, with
`faults` as an object of Faults fields. A crash fault ends the process (os._exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

from batch_runner.emulator.config import EmulatorConfig, Faults
from batch_runner.emulator.instance import serve


def config_from_json(text: str) -> EmulatorConfig:
    fields: dict[str, Any] = json.loads(text) if text else {}
    faults = Faults(**fields.pop("faults", {}))
    if fields.get("data_dir") is not None:
        fields["data_dir"] = Path(fields["data_dir"])
    return dataclasses.replace(EmulatorConfig(**fields), faults=faults, exit_on_crash=True)


async def _main(config: EmulatorConfig) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config, ready=lambda url: print(url, flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m batch_runner.emulator")
    parser.add_argument("--config", default="", help="EmulatorConfig fields as a JSON object")
    args = parser.parse_args()
    asyncio.run(_main(config_from_json(args.config)))


if __name__ == "__main__":
    main()
