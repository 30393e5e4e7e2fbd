"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}} with HTTP status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,  # noqa: A002
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model '{name}' does not exist.", param="model", code="model_not_found"
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = (
        f"{param}: {first.get('msg', 'invalid request')}"
        if param
        else first.get("msg", "invalid request")
    )
    return error_response(400, message, "invalid_request_error", param)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {
        401: "authentication_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
    }
    return error_response(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "api_error"))


def install_handlers(app: object) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[attr-defined]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[attr-defined]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[attr-defined]
