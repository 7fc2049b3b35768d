"""Routes under /admin/v1 for model versions: auth, one call to the versioned engine, the result.

Every change answers with the full version list, so a caller sees what it did. Failures are
OpenAI-shaped errors: 404 unknown version, 409 id taken by other files or a version in use (which
cannot be removed), 400 a change the registry refuses, 422 a version whose files are not a
loadable model or adapter, refused at registration or when it is first loaded (and the old
version keeps serving), 409 a change while the engine is released for a maintenance window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request

from clinicloop.backends.artifacts import VersionFilesError
from clinicloop.backends.registry import (
    RegistryError,
    UnknownVersion,
    Version,
    VersionConflict,
    VersionInUse,
    VersionSpec,
)
from clinicloop.serving.admin.protocol import (
    CanaryRequest,
    LoadedVersion,
    VersionList,
)
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.versions import EngineReleased, VersionedEngine, VersionLoadError


def admin_only(request: Request) -> None:
    # A dependency runs before the body is validated: a non-admin caller gets 403, not a 400.
    request.app.state.keys.caller(request, admin=True)


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(admin_only)])


def _versions(request: Request) -> VersionedEngine:
    versions: VersionedEngine | None = request.app.state.versions
    if versions is None:
        raise OpenAIError(404, "this server's engine serves no model versions",
                          code="versions_unsupported")
    return versions


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except UnknownVersion as exc:
        raise OpenAIError(404, str(exc), code="version_not_found") from None
    except VersionConflict as exc:
        raise OpenAIError(409, str(exc), code="version_conflict") from None
    except VersionInUse as exc:
        raise OpenAIError(409, str(exc), code="version_in_use") from None
    except VersionFilesError as exc:
        raise OpenAIError(422, str(exc), code="invalid_version_files") from None
    except RegistryError as exc:
        raise OpenAIError(400, str(exc), code="invalid_version") from None
    except VersionLoadError as exc:
        raise OpenAIError(422, str(exc), code="version_load_failed") from None
    except EngineReleased as exc:
        raise OpenAIError(409, str(exc), code="engine_released") from None


async def _listing(versions: VersionedEngine) -> VersionList:
    state = await asyncio.to_thread(versions.registry.read)
    return VersionList(
        data=state.ordered(),
        active=versions.active, canary=versions.canary,
        loaded=[LoadedVersion(id=vid, in_flight=n) for vid, n in versions.loaded().items()],
        history=state.history, memory=versions.memory(),
    )


@router.get("/versions")
async def list_versions(request: Request) -> VersionList:
    return await _listing(_versions(request))


@router.post("/versions", status_code=201)
async def register_version(body: VersionSpec, request: Request) -> Version:
    versions = _versions(request)
    with _errors():
        backend = await versions.check_files(body.backend, body.model_path, body.lora_path)
        return await asyncio.to_thread(body.register_in, versions.registry, backend)


@router.delete("/versions/{version_id}")
async def remove_version(version_id: str, request: Request) -> VersionList:
    """Take a version out of the registry (its files stay); 409 for the active version, the
    canary, and a parent of other versions."""
    versions = _versions(request)
    with _errors():
        await versions.remove(version_id)
    return await _listing(versions)


@router.post("/versions/{version_id}/activate")
async def activate_version(version_id: str, request: Request) -> VersionList:
    versions = _versions(request)
    with _errors():
        await versions.activate(version_id)
    return await _listing(versions)


@router.post("/canary")
async def set_canary(body: CanaryRequest, request: Request) -> VersionList:
    versions = _versions(request)
    with _errors():
        await versions.set_canary(body.version, body.share)
    return await _listing(versions)


@router.delete("/canary")
async def clear_canary(request: Request) -> VersionList:
    versions = _versions(request)
    with _errors():
        await versions.clear_canary()
    return await _listing(versions)


@router.post("/rollback")
async def rollback(request: Request) -> VersionList:
    versions = _versions(request)
    with _errors():
        await versions.rollback()
    return await _listing(versions)
