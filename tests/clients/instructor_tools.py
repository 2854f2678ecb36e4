"""instructor in TOOLS mode against a hive: a pydantic model as a forced tool call.

Run with the client venv's python (tests/test_clients.py). Reads HIVE_URL and HIVE_MODEL;
prints one JSON object. max_retries=0: the answer is valid because Hive's grammar made it
so, not because instructor asked again.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Annotated, Literal

import instructor
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field


class Sky(enum.Enum):
    SUNNY = "sunny"
    CLOUDY = "cloudy"
    RAIN = "rain"


class Forecast(BaseModel):
    """The weather in a city."""

    # Closed, as a user's strict model would be (Hive closes a listed object's keys
    # itself too: shared/json_grammar.py), so the schema sent says what is checked.
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    temperature_c: int = Field(ge=-40, le=50)
    sky: Sky
    unit: Literal["celsius", "fahrenheit"]
    alerts: list[Annotated[str, Field(max_length=10)]] = Field(max_length=2)


client = instructor.from_openai(OpenAI(base_url=f"{os.environ['HIVE_URL']}/v1", api_key="x", max_retries=0), mode=instructor.Mode.TOOLS)
forecast = client.chat.completions.create(
    model=os.environ["HIVE_MODEL"],
    messages=[{"role": "user", "content": "The weather in Paris, please."}],
    response_model=Forecast,
    max_retries=0,
    max_tokens=300,
    seed=1,
)
print(json.dumps({"version": instructor.__version__, "type": type(forecast).__name__, "value": forecast.model_dump(mode="json")}))
