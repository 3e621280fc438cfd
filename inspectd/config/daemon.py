"""[daemon]: the process itself: shutdown, warm-up, health."""

from __future__ import annotations

__all__ = ["DaemonConfig"]

from inspectd.config.base import Reload, Section, setting


class DaemonConfig(Section):
    shutdown_timeout_s: float = setting(
        10, reload=Reload.RESTART, ge=0.1, le=3600, description="longest wait for the batch in flight at shutdown"
    )
    warmup: bool = setting(True, reload=Reload.RESTART, description="compile every batch size before reporting ready")
    stuck_after_s: float = setting(
        30,
        reload=Reload.LIVE,
        ge=1,
        le=86400,
        description="a stage stuck in one call this long is unhealthy: /healthz fails and systemd watchdog pings stop",
    )
