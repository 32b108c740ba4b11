"""The exit codes of the server's processes, one place for the supervisor, its workers and
``uvicorn --factory`` (uvicorn's own code for a failed start-up is the same)."""

from __future__ import annotations

from typing import Final

#: Start-up failed (no model, bad settings): restarting will not help until the cause is fixed.
EXIT_STARTUP_FAILED: Final = 3
