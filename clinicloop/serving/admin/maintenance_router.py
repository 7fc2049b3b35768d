"""Routes under /admin/v1/maintenance: open, renew, resume, close and read the gateway's
maintenance window (`serving/maintenance.py`), admin key only; failures are OpenAI-shaped errors
(409 a window already open or a drain that timed out, 404 no window, 400 a fallback not
configured, 503 a fallback that does not answer)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from clinicloop.serving.admin.api_router import admin_only
from clinicloop.serving.admin.protocol import (
    MaintenanceOpen,
    MaintenanceRenew,
    MaintenanceState,
    WindowStatus,
    WindowSummary,
)
from clinicloop.serving.maintenance import Maintenance

router = APIRouter(prefix="/admin/v1/maintenance", dependencies=[Depends(admin_only)])


def _maintenance(request: Request) -> Maintenance:
    maintenance: Maintenance = request.app.state.maintenance
    return maintenance


@router.get("")
async def read_window(request: Request) -> MaintenanceState:
    return _maintenance(request).state()


@router.post("")
async def open_window(body: MaintenanceOpen, request: Request) -> WindowStatus:
    """Answers once the requests in flight are done and the engine is released."""
    return await _maintenance(request).open(body)


@router.post("/renew")
async def renew_window(request: Request, body: MaintenanceRenew | None = None) -> WindowStatus:
    return await _maintenance(request).renew(body or MaintenanceRenew())


@router.post("/resume")
async def resume_engine(request: Request) -> WindowStatus:
    return await _maintenance(request).resume()


@router.delete("")
async def close_window(request: Request) -> WindowSummary:
    return await _maintenance(request).close()
