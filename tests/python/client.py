"""A new user's Python client: generate stubs from proto/ with grpcio-tools,
then call Generate and ChatStream on the gateway given as argv[1]. Prints one
JSON object with what came back (the Rust test asserts on it)."""

import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main(address: str) -> None:
    out = tempfile.mkdtemp()
    proto = "aquila/v1/generation.proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", proto])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    from aquila.v1 import generation_pb2 as pb
    from aquila.v1 import generation_pb2_grpc as rpc

    stub = rpc.GenerationStub(grpc.insecure_channel(address))
    greedy = pb.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    unary = stub.Generate(pb.GenerateRequest(prompt_token_ids=[84, 104, 101, 32, 113, 117, 105, 99, 107], params=greedy))
    chunks = list(
        stub.ChatStream(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], params=greedy))
    )
    print(
        json.dumps(
            {
                "generate_ids": list(unary.token_ids),
                "generate_finish": pb.FinishReason.Name(unary.finish_reason),
                "chat_messages": len(chunks),
                "chat_tokens": sum(len(c.token_ids) for c in chunks),
                "chat_finish": pb.FinishReason.Name(chunks[-1].finish_reason),
                "chat_prompt_tokens": chunks[-1].usage.prompt_tokens,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
