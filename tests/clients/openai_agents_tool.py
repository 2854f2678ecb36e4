"""The OpenAI Agents SDK against a hive: an agent that must call a function tool, then
answers from the tool's result; over /v1/responses or /v1/chat/completions.

Run with the client venv's python (tests/test_clients.py) as ``openai_agents_tool.py API``,
API ``responses`` or ``chat_completions``. Reads HIVE_URL and HIVE_MODEL; prints one JSON
object. Tracing is off: nothing is sent to OpenAI's servers.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from typing import Annotated, Literal

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI
from pydantic import BaseModel, ConfigDict, Field

calls: list[dict] = []


@function_tool
def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city."""
    calls.append({"city": city, "unit": unit})
    return f"21 degrees {unit} and sunny in {city}"


class Report(BaseModel):
    """The final answer (a json_schema response format): a closed object of bounded
    fields, which the grammar ends well within max_tokens, where free text from a random
    model would run to max_tokens (an incomplete response, an error to the SDK)."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    summary: str = Field(max_length=20)


set_tracing_disabled(True)
client = AsyncOpenAI(base_url=f"{os.environ['HIVE_URL']}/v1", api_key="x", max_retries=0)
model_type = {"responses": OpenAIResponsesModel, "chat_completions": OpenAIChatCompletionsModel}[sys.argv[1]]
agent = Agent(
    name="weather",
    instructions="Answer with the weather, which get_weather gives.",
    model=model_type(model=os.environ["HIVE_MODEL"], openai_client=client),
    tools=[get_weather],
    output_type=Report,
    # "required" for the first turn: the SDK resets it to "auto" once the tool has run
    # (Agent.reset_tool_choice), so a later turn can answer. One call per turn: a random
    # model would otherwise add calls up to max_tokens, and the Responses model takes an
    # incomplete response for a failure. seed: Hive's own field, for a reproducible run.
    model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=200, extra_body={"seed": 1}),
)
# With "auto" a random model may call the tool again before it answers: 4 turns leave room.
result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
items = [item.type for item in result.new_items]
print(json.dumps({"version": version("openai-agents"), "calls": calls, "items": items, "final_output_type": type(result.final_output).__name__, "final_output": result.final_output.model_dump()}))
