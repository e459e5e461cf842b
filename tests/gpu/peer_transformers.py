"""The GPU check's peer: PyTorch + transformers `LlamaForCausalLM` in bf16 on
the same GPU, Aquila-7B's shape, random weights made on the GPU (no
download). Prints one JSON object per measurement, the same measurements
as `aquila gpu-check`: prefill of 8 × 512 tokens, and decode tokens/s at
each batch size (`generate`, greedy, 32-token prompts, 64 new tokens)."""

import argparse
import json
import sys
import time

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # the script says so instead of failing the check
    print(json.dumps({"peer": "transformers", "skipped": f"not installed: {e}"}))
    sys.exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"peer": "transformers", "skipped": "no CUDA device"}))
        return
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=100008,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    torch.set_default_dtype(torch.bfloat16)
    started = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.cuda.synchronize()
    print(json.dumps({"peer": "transformers", "what": "load", "seconds": time.time() - started,
                      "torch": torch.__version__}), flush=True)
    with torch.inference_mode():
        ids = torch.randint(0, 100000, (8, 512), device="cuda")
        model(ids)
        torch.cuda.synchronize()
        t = time.time()
        model(ids)
        torch.cuda.synchronize()
        print(json.dumps({"peer": "transformers", "what": "prefill 8 × 512 tokens",
                          "tokens_per_s": 8 * 512 / (time.time() - t)}), flush=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompt = torch.randint(0, 100000, (batch, 32), device="cuda")
            gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False, pad_token_id=0)
            model.generate(prompt, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
            torch.cuda.synchronize()
            t = time.time()
            model.generate(prompt, **gen)
            torch.cuda.synchronize()
            secs = time.time() - t
            print(json.dumps({"peer": "transformers", "what": f"decode, batch {batch}",
                              "tokens_per_s": batch * args.new_tokens / secs}), flush=True)


if __name__ == "__main__":
    main()
