"""An app that gives the model a tool: it asks about a sensor, the model calls `read_sensor`
(its arguments follow the tool's schema by construction), the app reads the sensor and sends
the result back, and the model answers in words. Uses only the official `openai` client.

    edge-runtime up &                      # the default model on http://127.0.0.1:8080/v1
    python examples/tool_call_sensor.py ["How warm is it in the greenhouse?"]

EDGE_RUNTIME_URL and EDGE_RUNTIME_API_KEY point it at another gateway.
"""

from __future__ import annotations

import json
import os
import sys

from openai import OpenAI

READ_SENSOR = {
    "type": "function",
    "function": {
        "name": "read_sensor",
        "description": "Read the current value of a sensor in a room",
        "parameters": {
            "type": "object",
            "properties": {
                "sensor": {"type": "string", "enum": ["temperature", "humidity"]},
                "room": {"type": "string", "description": "where the sensor is, e.g. kitchen"},
            },
            "required": ["sensor", "room"],
            "additionalProperties": False,
        },
    },
}


def read_sensor(sensor: str, room: str) -> dict:
    """Stands in for the gateway's real sensor bus."""
    readings = {"temperature": (21.5, "C"), "humidity": (63, "%")}
    value, unit = readings[sensor]
    return {"room": room, "sensor": sensor, "value": value, "unit": unit}


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the temperature in the kitchen?"
    client = OpenAI(base_url=os.environ.get("EDGE_RUNTIME_URL", "http://127.0.0.1:8080/v1"),
                    api_key=os.environ.get("EDGE_RUNTIME_API_KEY", "unused-on-loopback"))
    model = client.models.list().data[0].id
    messages: list[dict] = [{"role": "user", "content": question}]
    print(f"user: {question}")
    # A small model decides more reliably when told to call: require a call first, then let it answer.
    first = client.chat.completions.create(model=model, messages=messages, tools=[READ_SENSOR], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=128)
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)  # valid JSON that follows the schema, always
        result = read_sensor(**arguments)
        print(f"tool call: {call.function.name}({call.function.arguments}) -> {json.dumps(result)}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(model=model, messages=messages, tools=[READ_SENSOR], tool_choice="none",
                                           temperature=0, max_tokens=128)
    print(f"assistant: {final.choices[0].message.content}")


if __name__ == "__main__":
    main()
