"""pydantic-ai against a hive: an Agent whose output_type is a pydantic model (sent as an
output tool that the model must call).

Run with the client venv's python (tests/test_clients.py). Reads HIVE_URL and HIVE_MODEL;
prints one JSON object. retries=0: the output is valid because Hive's grammar made it so.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider


class Forecast(BaseModel):
    """The weather in a city."""

    # Closed, as a user's strict model would be (Hive closes a listed object's keys
    # itself too: shared/json_grammar.py), so the schema sent says what is checked.
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    temperature_c: int = Field(ge=-40, le=50)
    sky: Literal["sunny", "cloudy", "rain"]
    alerts: list[Annotated[str, Field(max_length=10)]] = Field(max_length=2)


model = OpenAIChatModel(os.environ["HIVE_MODEL"], provider=OpenAIProvider(base_url=f"{os.environ['HIVE_URL']}/v1", api_key="x"))
agent = Agent(model, output_type=Forecast, instructions="Report the weather.", retries=0, model_settings={"max_tokens": 300, "seed": 1})
result = agent.run_sync("The weather in Paris, please.")
print(json.dumps({"version": version("pydantic-ai-slim"), "type": type(result.output).__name__, "value": result.output.model_dump(mode="json")}))
