"""Request and response bodies of the HTTP API (they drive validation and the OpenAPI docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

# Every number in a request is finite: NaN or infinite weights would give silently wrong answers.
FiniteWeight = Annotated[float, Field(allow_inf_nan=False, ge=0)]


class ErrorResponse(BaseModel):
    """Every refusal: a sentence naming what to fix, or (a body of the wrong shape) where it is wrong."""

    detail: str | list[dict] = Field(..., description="what is wrong, and where")


# How each refusal is documented in the OpenAPI schema (the statuses the handlers return).
ERRORS = {400: "malformed JSON", 401: "admin call without a token", 403: "wrong token, admin off, or outside the sets root",
          404: "unknown set or task", 409: "a set of that name is loaded", 413: "body or inputs over the limits",
          422: "a body of the wrong shape, or inputs that cannot be answered"}
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": why} for status, why in ERRORS.items()}


class PredictRequest(BaseModel):
    set: str | None = Field(None, description="a loaded set (default: the first one loaded)")
    task: str = Field(..., description="a task of that set")
    inputs: list[str | list[str]] = Field(..., description="sentences, or [first, second] pairs for pair tasks")


class EnsembleRequest(BaseModel):
    sets: list[str] = Field(..., min_length=2, description="loaded sets that share the task")
    task: str
    inputs: list[str | list[str]]
    method: str = Field("mean", description="mean | vote (classification); mean | median (regression)")
    weights: list[FiniteWeight] | None = Field(None, description="one finite, non-negative weight per set "
                                                                  "(default: equal)")


class LoadRequest(BaseModel):
    name: str = Field(..., description="the name requests will use")
    folder: str = Field(..., description="a folder written by `peft-mtl train`, under --sets-root")


class Prediction(BaseModel):
    label: str | int | None = Field(None, description="classification: the class name (or index)")
    probabilities: list[float] | None = Field(None, description="classification: one per class, in label order")
    score: float | None = Field(None, description="regression: the predicted value")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    set: str
    task: str


class EnsembleResponse(BaseModel):
    predictions: list[Prediction]
    sets: list[str]
    task: str
