"""Python client for the Distilcast forecasting service (pandas in, pandas out)."""

from distilcast_client.client import AsyncClient, BacktestResult, Client, RetryPolicy
from distilcast_client.errors import (
    BadRequest,
    Conflict,
    DistilcastError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    SeriesFailed,
    ServerError,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from distilcast_client.plot import plot

__all__ = [
    "AsyncClient", "BacktestResult", "BadRequest", "Client", "Conflict", "DistilcastError",
    "Forbidden", "InvalidInput", "NotFound", "PayloadTooLarge", "RateLimited", "RetryPolicy",
    "SeriesFailed", "ServerError", "Unauthorized", "Unavailable", "Unreachable", "plot",
]
