"""Request and response bodies of the admin routes: model versions (a version to register is the
registry's `VersionSpec`) and the maintenance window."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicloop.backends.registry import Activation, Canary, Version


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    share: float = Field(ge=0.0, le=1.0, description="Fraction of new conversations it gets.")


class LoadedVersion(BaseModel):
    id: str
    in_flight: int


class VersionList(BaseModel):
    """The registry's versions and what the server serves now."""

    object: Literal["list"] = "list"
    data: list[Version]
    active: str | None
    canary: Canary | None
    loaded: list[LoadedVersion]
    history: list[Activation]
    memory: dict[str, Any] = Field(
        description="Process RSS, the shared bases' bytes, and per loaded version what it holds "
                    "beyond them (its KV cache, its adapter); empty where the engine cannot tell.")


# -- maintenance windows (`maintenance_router.py`) -----------------------------------------------

Treatment = Literal["queue", "fallback", "refuse"]
#: What the engine is doing during a window: serving, or released (`VersionedEngine.suspend`).
EngineState = Literal["serving", "sleep", "stop", "kept"]
ClosedBy = Literal["admin", "lease_expired", "drain_timeout", "release_failed", "shutdown"]
# Strict numbers (no `true` as 1.0, no numeric strings) within bounds no window needs to pass.
_DAY_S = 86400.0


class MaintenanceOpen(BaseModel):
    """`POST /admin/v1/maintenance`: open a window."""

    model_config = ConfigDict(extra="forbid")

    treatment: Treatment | None = Field(
        None, description="What requests get during the window (default: "
        "`server.maintenance.treatment`).")
    expected_s: float = Field(3600.0, gt=0, le=30 * _DAY_S, strict=True, allow_inf_nan=False,
                              description="How long the window is expected to last: a refused "
                              "request's `retry-after` counts down to its end.")
    lease_s: float | None = Field(None, gt=0, le=_DAY_S, strict=True, allow_inf_nan=False,
                                  description="Closed by itself if not renewed for this long "
                                  "(default: `server.maintenance.lease_s`).")
    release_engine: bool = Field(True, strict=True,
                                 description="Free the engine's accelerator once drained.")
    reason: str | None = Field(None, max_length=200, strict=True)


class MaintenanceRenew(BaseModel):
    """`POST /admin/v1/maintenance/renew`: extend the lease (and the expected end, from now)."""

    model_config = ConfigDict(extra="forbid")

    lease_s: float | None = Field(None, gt=0, le=_DAY_S, strict=True, allow_inf_nan=False)
    expected_s: float | None = Field(None, gt=0, le=30 * _DAY_S, strict=True,
                                     allow_inf_nan=False)


class WindowCounts(BaseModel):
    """Requests that arrived during a window, by what they got."""

    queued: int = 0
    fallback: int = 0
    refused: int = 0
    queue_full: int = 0
    queue_timeouts: int = 0


class _Window(BaseModel):
    id: str
    treatment: Treatment
    reason: str | None
    opened_at: float = Field(description="Epoch seconds.")
    expected_end: float = Field(description="Epoch seconds.")
    lease_expires_at: float = Field(description="Epoch seconds.")
    engine: EngineState = Field(description="What the engine is doing now.")
    released: EngineState | None = Field(
        description="How the engine was released during the window (`sleep`, `stop`, `kept`), "
        "kept after it serves again; None if it was not released.")
    counts: WindowCounts
    drain_s: float | None = Field(description="How long requests in flight took to finish.")
    release_s: float | None = Field(description="How long releasing the engine took.")


class WindowStatus(_Window):
    open: Literal[True] = True


class WindowSummary(_Window):
    open: Literal[False] = False
    closed_at: float = Field(description="Epoch seconds.")
    closed_by: ClosedBy = Field(description="Who closed it: `admin` (DELETE), its lease, or "
                               "a failed open (`drain_timeout`, `release_failed`), or the "
                               "server's shutdown.")
    resume_s: float | None = Field(description="How long resuming the engine took.")
    error: str | None = Field(description="What failed (a resume, a release), if anything.")


class MaintenanceState(BaseModel):
    window: WindowStatus | None
    history: list[WindowSummary] = Field(description="The last windows closed, oldest first.")
