"""The Flower ServerApp: reads the run settings, then hands over to ``server.strategy.run_federation``.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . --run-config ...``, or
the defaults that ``python -m simulation`` bakes in with ``create_server_app``):

- ``config-path``: the YAML config (absolute, relative to the working directory, or relative to
  the app folder, where ``configs/`` ships inside the Flower app bundle);
- ``overrides``: ``section.key=value`` items separated by spaces (quote a value with spaces);
- ``run-dir``: the run folder (default ``<out_dir>/<name>`` of the config, relative to the
  SuperLink's working directory: pass an absolute path with ``flwr run``);
- ``resume``: continue from the last ``round_XXX.pt`` in the run folder;
- ``site-state-dir``: where simulated sites keep their local state between rounds on disk
  (``auto``: ``<run-dir>/site_state``; empty: memory only). Real SuperNodes ignore it and use
  their own ``state-dir`` node config;
- ``server-data``: ``config`` (the server loads the held-out split of ``data`` for evaluation) or
  ``none`` (deployment without data at the server: sample grids only);
- ``stop-after``: end after this round as if the server had been killed (0: never); for testing
  ``resume``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medstylegan2.config import RunConfig, load_config
from medstylegan2.errors import UserError

APP_ROOT = Path(__file__).resolve().parents[1]

DEFAULTS: dict[str, Any] = {
    "config-path": "configs/default.yaml",
    "overrides": "",
    "run-dir": "",
    "resume": False,
    "site-state-dir": "auto",
    "server-data": "config",
    "stop-after": 0,
}


@dataclass
class ServerSettings:
    cfg: RunConfig
    run_dir: Path
    resume: bool
    site_state_dir: str
    server_data: bool
    stop_after: int = 0


def resolve_config_path(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_absolute() or path.is_file():
        return path.resolve() if path.is_file() else path
    bundled = APP_ROOT / path
    return bundled if bundled.is_file() else path


def settings_from_run_config(run_config: Mapping[str, Any]) -> ServerSettings:
    merged = {**DEFAULTS, **dict(run_config)}
    unknown = sorted(set(merged) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown run config key {unknown[0]!r}; allowed: {', '.join(DEFAULTS)}")
    cfg = load_config(resolve_config_path(str(merged["config-path"])), shlex.split(str(merged["overrides"])))
    run_dir = Path(str(merged["run-dir"]) or cfg.run_dir).expanduser().resolve()
    state_dir = str(merged["site-state-dir"])
    if state_dir == "auto":
        state_dir = str(run_dir / "site_state")
    elif state_dir:
        state_dir = str(Path(state_dir).expanduser().resolve())
    server_data = str(merged["server-data"])
    if server_data not in ("config", "none"):
        raise UserError(f"run config 'server-data' = {server_data!r}; use 'config' or 'none'")
    return ServerSettings(cfg=cfg, run_dir=run_dir, resume=bool(merged["resume"]), site_state_dir=state_dir,
                          server_data=server_data == "config", stop_after=int(merged["stop-after"]))


def create_server_app(defaults: Optional[Mapping[str, Any]] = None) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (``run_simulation`` passes none)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.strategy import run_federation

        settings = settings_from_run_config({**(defaults or {}), **dict(context.run_config)})
        run_federation(grid, settings.cfg, settings.run_dir, resume=settings.resume,
                       site_state_dir=settings.site_state_dir, server_data=settings.server_data,
                       stop_after=settings.stop_after)

    return server_app


app = create_server_app()
