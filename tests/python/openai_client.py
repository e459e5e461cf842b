"""The official OpenAI Python client against the gateway's HTTP API, as a user
would point it at any OpenAI-compatible server: list the models, stream a
greedy chat completion, and send a bad temperature. argv[1] is the base URL
("http://127.0.0.1:PORT/v1"). Prints one JSON object with what came back (the
Rust test, tests/openai_http.rs, asserts on it)."""

import json
import sys

import openai


def main(base_url: str) -> None:
    # No retries: a failure must show, not be hidden by a second try.
    client = openai.OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Hi"}]

    stream = client.chat.completions.create(
        model=models[0],
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        # A server extension (as in vLLM): exactly max_tokens tokens.
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]

    try:
        client.chat.completions.create(model=models[0], messages=messages, temperature=-1)
        bad = {"raised": None}
    except openai.BadRequestError as e:
        bad = {
            "raised": "BadRequestError",
            "status": e.status_code,
            "type": e.type,
            "param": e.param,
            "code": e.code,
            "message": e.message,
        }

    print(
        json.dumps(
            {
                "models": models,
                "chunks": len(chunks),
                "ids": sorted({c.id for c in chunks}),
                "objects": sorted({c.object for c in chunks}),
                "first_role": with_choices[0].choices[0].delta.role,
                "content": "".join(c.choices[0].delta.content or "" for c in with_choices),
                "finish_reasons": [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason],
                "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
                "bad": bad,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
