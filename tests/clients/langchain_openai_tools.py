"""LangChain's ChatOpenAI against a hive: structured output (its default method, a strict
json_schema response_format, or a forced strict function call) and a tool bound with a forced choice.

Run with the client venv's python (tests/test_clients.py) as ``langchain_openai_tools.py CASE``,
CASE one of ``json_schema``, ``function_calling``, ``bind_tools_any``, ``bind_tools_named``.
Reads HIVE_URL and HIVE_MODEL; prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from typing import Annotated, Literal

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field


class Forecast(BaseModel):
    """The weather in a city."""

    # Closed, as a user's strict model would be (Hive closes a listed object's keys
    # itself too: shared/json_grammar.py), so the schema sent says what is checked.
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    temperature_c: int = Field(ge=-40, le=50)
    sky: Literal["sunny", "cloudy", "rain"]
    alerts: list[Annotated[str, Field(max_length=10)]] = Field(max_length=2)


class WeatherQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=WeatherQuery)
def get_weather(city: str, unit: str) -> str:
    """The weather in a city."""
    return f"21 degrees {unit} in {city}"


# strict=True for function calls: without it LangChain drops additionalProperties from the
# tool's schema, and an open object lets a random model add keys until max_tokens.
case = sys.argv[1]
llm = ChatOpenAI(base_url=f"{os.environ['HIVE_URL']}/v1", api_key="x", model=os.environ["HIVE_MODEL"], max_tokens=300, seed=1, max_retries=0)
question = "The weather in Paris, please."
if case in ("json_schema", "function_calling"):
    structured = llm.with_structured_output(Forecast) if case == "json_schema" else llm.with_structured_output(Forecast, method="function_calling", strict=True)
    forecast = structured.invoke(question)
    result = {"type": type(forecast).__name__, "value": forecast.model_dump(mode="json")}
else:
    message = llm.bind_tools([get_weather], tool_choice="any" if case == "bind_tools_any" else "get_weather", strict=True).invoke(question)
    result = {"type": type(message).__name__, "tool_calls": message.tool_calls, "invalid_tool_calls": message.invalid_tool_calls}
print(json.dumps({"version": version("langchain-openai"), **result}))
