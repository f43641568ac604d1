"""The HTTP side of several routers per engine: ``/v1/models`` lists them, and they load and unload at run time.

    GET    /v1/models                      vLLM's list + one entry per router and per mode alias (parent: the base)
    GET    /v1/taro/routers                the loaded routers (the default first)
    POST   /v1/taro/routers                {"name": "code", "path": "/ckpts/code-router"}: load (checked exactly as
                                           at start-up; a bad checkpoint is a 400 and the engine serves on)
    DELETE /v1/taro/routers/{name}         unload (409 while requests use it; the default cannot be unloaded)

The engine side (``taro_load_router`` / ``taro_unload_router`` on the worker extension) adds the router to the
model's RouterSet between steps; the API process keeps the names in its Settings (responses.py), which is what
admission checks requests against.
"""


import asyncio
import time

from taro_vllm.serving.responses import error_response as _error
from taro_vllm.serving.routers import NAME

NOT_READY = (503, "TARo is not initialised on this server", "ServiceUnavailable")


def _check_router_files(engine_client, path: str) -> str | None:
    """The start-up checks of a router against this engine's models, in the API process (None: it fits)."""
    from taro_vllm.pairing import TaroSetupError, validate_extra_router, validate_setup

    hf = engine_client.model_config.hf_config
    try:
        setup = validate_setup(engine_client.model_config.model, hf.taro_router, getattr(hf, "taro_reward_model", None))
        validate_extra_router(setup, path)
    except (TaroSetupError, ValueError, OSError) as e:
        return str(e)
    return None


def attach(router, taro_settings) -> None:
    """Add the routes to the endpoint plugin's APIRouter; ``taro_settings(request)`` gives the Settings."""
    from fastapi import Request

    @router.get("/v1/models")
    async def models(request: Request):
        listing = (await request.app.state.openai_serving_models.show_available_models()).model_dump()
        settings = taro_settings(request)
        if settings is None:
            return listing
        created = int(time.time())
        base = settings.base_model
        for name, path in settings.routers.items():
            listing["data"].append({"id": name, "object": "model", "created": created, "owned_by": "taro_vllm",
                                    "root": path, "parent": base, "permission": []})
        for name, mode in settings.aliases.items():
            listing["data"].append({"id": name, "object": "model", "created": created, "owned_by": "taro_vllm",
                                    "root": mode, "parent": base, "permission": []})
        return listing

    @router.get("/v1/taro/routers")
    async def list_routers(request: Request):
        settings = taro_settings(request)
        if settings is None:
            return _error(*NOT_READY)
        return {"default": settings.default_router,
                "routers": [{"name": n, "path": p, "requests_in_flight": settings.in_flight.get(n, 0)}
                            for n, p in settings.routers.items()]}

    @router.post("/v1/taro/routers")
    async def load_router(request: Request):
        settings = taro_settings(request)
        if settings is None:
            return _error(*NOT_READY)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'expected a JSON object {"name": ..., "path": ...}', "BadRequestError")
        name, path = (body.get("name"), body.get("path")) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not NAME.match(name):
            return _error(400, "name must be 1-64 characters of letters, digits, '.', '_' and '-'", "BadRequestError")
        if not isinstance(path, str) or not path:
            return _error(400, "path must be the router checkpoint folder", "BadRequestError")
        if name in settings.routers or name in settings.aliases or name == settings.base_model:
            return _error(409, f"the name {name!r} is already served; unload it first or pick another",
                          "ConflictError")
        client = request.app.state.taro_engine_client
        problem = await asyncio.to_thread(_check_router_files, client, path)
        if problem is None:
            answers = await client.collective_rpc("taro_load_router", args=(name, path))
            problem = next((a for a in answers if a), None)
        if problem is not None:
            return _error(400, f"router {name!r} not loaded: {problem}", "BadRequestError")
        settings.routers[name] = path
        return {"name": name, "path": path, "loaded": True}

    @router.delete("/v1/taro/routers/{name}")
    async def unload_router(name: str, request: Request):
        settings = taro_settings(request)
        if settings is None:
            return _error(*NOT_READY)
        if name not in settings.routers:
            return _error(404, f"no router {name!r} is loaded; loaded: {sorted(settings.routers)}", "NotFoundError")
        if name == settings.default_router:
            return _error(400, f"{name!r} is the default router of this engine; it cannot be unloaded",
                          "BadRequestError")
        busy = settings.in_flight.get(name, 0)
        if busy:
            return _error(409, f"router {name!r} is used by {busy} request(s) in flight; retry when they end",
                          "ConflictError")
        del settings.routers[name]  # admission refuses it from now on; then the engine drops it
        answers = await request.app.state.taro_engine_client.collective_rpc("taro_unload_router", args=(name,))
        problem = next((a for a in answers if a), None)
        if problem is not None:
            return _error(500, f"router {name!r}: {problem}", "InternalServerError")
        return {"name": name, "unloaded": True}


class RouterRPC:
    """Worker-extension methods (mixed into vLLM's worker): load and unload a router in this worker's model.
    They return an error message instead of raising, so a bad checkpoint never reaches the engine loop."""

    def taro_load_router(self, name: str, path: str) -> str | None:
        try:
            self.get_model().load_router(name, path)
        except Exception as e:  # noqa: BLE001 - reported to the client as a 400; the engine serves on
            return str(e)
        return None

    def taro_unload_router(self, name: str) -> str | None:
        try:
            self.get_model().unload_router(name)
        except Exception as e:  # noqa: BLE001
            return str(e)
        return None
