#!/usr/bin/env python3
"""Peer benchmarks: llama.cpp (llama-cpp-python) and HF transformers on CPU.

What is measured (single stream, batch 1, greedy):
  * prompt_tok_per_s: prompt-processing (prefill) speed for a fixed prompt of
    exactly --prompt-tokens tokens (a fixed English text, repeated and cut).
  * decode_tok_per_s: token-by-token greedy decode speed, excluding prefill.
      llamacpp:     prefill = one llm.eval(prompt) call (n_batch=512); decode =
                    --gen-tokens successive llm.eval([tok]) calls, tok = argmax
                    of the previous logits (EOS does not stop it).
      transformers: model.generate(do_sample=False, min_new_tokens=max_new_tokens)
                    timed with max_new_tokens=1 (prefill, t_p) and with
                    max_new_tokens=G (t_g); decode rate = (G-1)/(t_g - t_p),
                    since the first new token comes out of the prefill pass.
Each run is preceded by one warm-up; --repeats runs are made and the medians
are printed as one JSON line (all runs are listed in *_runs, best in *_max).
Threads spin-wait in both engines, so on a busy machine single runs can be
10-20x slower: look at the spread, and rerun when the machine is quiet.

  peers.py llamacpp --gguf M.gguf --threads 2 --prompt-tokens 40 --gen-tokens 128
  peers.py transformers --model DIR_OR_GGUF [--gguf-file NAME] [--dtype bf16] --threads 2 --gen-tokens 128
  peers.py chat-llamacpp --gguf M.gguf   # greedy chat answer + token ids (GGUF chat template)

Run it with the venv made by setup-peers.sh.
"""
import argparse
import json
import os
import statistics
import sys
import time

TEXT = (
    "The history of the city begins with a small settlement on the banks of a wide river. "
    "Merchants came from the south with salt, cloth and iron, and farmers from the hills "
    "brought grain and wool to the market every week. Over the centuries the town grew, "
    "walls were built, bridges crossed the water, and a university was founded where "
    "scholars studied law, medicine, astronomy and the languages of distant lands. "
)
CHAT_QUESTION = "What is the capital of France? Answer in one word."


def fixed_prompt(tokenize, n):
    """Exactly n token ids of the fixed text (repeated as needed)."""
    text = TEXT
    while len(tokenize(text)) < n:
        text += TEXT
    return tokenize(text)[:n]


def report(args, engine, model, runs):
    """runs: list of (prompt_tok_per_s, decode_tok_per_s)."""
    pp = [round(r[0], 2) for r in runs]
    tg = [round(r[1], 2) for r in runs]
    print(json.dumps({
        "engine": engine, "model": model, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "prompt_tok_per_s": statistics.median(pp),
        "decode_tokens": args.gen_tokens, "decode_tok_per_s": statistics.median(tg),
        "prompt_runs": pp, "decode_runs": tg,   # spread; max ~ the least-disturbed run
        "prompt_tok_per_s_max": max(pp), "decode_tok_per_s_max": max(tg),
    }), flush=True)


# ---------------------------------------------------------------- llama.cpp
def last_logits(llm):
    """Logits of the last evaluated token (llm.scores is not filled unless logits_all)."""
    import numpy as np
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def load_llama(path, threads, n_ctx):
    from llama_cpp import Llama
    return Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, n_ctx=n_ctx, seed=0, verbose=False)


def bench_llamacpp(args):
    import numpy as np
    llm = load_llama(args.gguf, args.threads, max(2048, args.prompt_tokens + args.gen_tokens + 8))
    prompt = fixed_prompt(lambda t: llm.tokenize(t.encode(), add_bos=True), args.prompt_tokens)

    def once(gen):
        llm.reset()                      # n_tokens = 0; eval() drops the stale KV cells
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(gen):
            tok = int(np.argmax(last_logits(llm)))
            llm.eval([tok])
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), gen / (t2 - t1)

    runs = []
    for _ in range(args.repeats):
        once(min(8, args.gen_tokens))    # warm-up
        runs.append(once(args.gen_tokens))
    report(args, "llama.cpp", os.path.basename(args.gguf), runs)


def bench_llamacpp_parallel(args):
    """--parallel sequences decoded together, as llama.cpp's server does with
    that many slots: one llama_batch per step holding every sequence's token
    (low-level API; prompts are distinct id runs, greedy decode)."""
    import numpy as np
    import llama_cpp as L
    L.llama_backend_init()
    model = L.llama_model_load_from_file(args.gguf.encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    P, T, G = args.parallel, args.prompt_tokens, args.gen_tokens
    cp = L.llama_context_default_params()
    cp.n_ctx = P * (T + G + 8)
    cp.n_batch = cp.n_ubatch = max(512, P * T)
    cp.n_seq_max = P
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(max(512, P * T), 0, P)

    def decode(entries):
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def next_tokens(rows):
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), shape=(n_vocab,))))
                for r in rows]

    def once(gen):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        prompts = [[1000 + 37 * s + j for j in range(T)] for s in range(P)]
        t0 = time.perf_counter()
        decode([(tok, j, s, j == T - 1) for s in range(P) for j, tok in enumerate(prompts[s])])
        last = next_tokens([s * T + T - 1 for s in range(P)])
        t1 = time.perf_counter()
        for step in range(gen):
            decode([(last[s], T + step, s, True) for s in range(P)])
            last = next_tokens(range(P))
        t2 = time.perf_counter()
        return P * T / (t1 - t0), P * gen / (t2 - t1)

    runs = []
    for _ in range(args.repeats):
        once(min(8, G))                  # warm-up
        runs.append(once(G))
    report(args, f"llama.cpp x{P}", os.path.basename(args.gguf), runs)


def chat_llamacpp(args):
    import numpy as np
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm = load_llama(args.gguf, args.threads, 2048)
    md = llm.metadata
    tok_str = lambda i: llm._model.token_get_text(i)
    fmt = Jinja2ChatFormatter(template=md["tokenizer.chat_template"],
                              eos_token=tok_str(llm.token_eos()), bos_token=tok_str(llm.token_bos()))
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    res = fmt(messages=messages)
    # same tokenization as llama-cpp-python's Jinja2 chat handler
    prompt_ids = llm.tokenize(res.prompt.encode(), add_bos=not res.added_special, special=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt_ids)
    out, stop = [], None
    for _ in range(args.max_tokens):
        tok = int(np.argmax(last_logits(llm)))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            stop = tok
            break
        out.append(tok)
        llm.eval([tok])
    answer = llm.detokenize(out).decode("utf-8", errors="replace")
    # cross-check with the library's own chat completion (temperature 0 = greedy sampler)
    cc = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=args.max_tokens)
    print(json.dumps({
        "engine": "llama.cpp", "model": os.path.basename(args.gguf), "question": CHAT_QUESTION,
        "prompt": res.prompt, "prompt_token_ids": prompt_ids,
        "answer": answer, "token_ids": out, "stop_token_id": stop,
        "create_chat_completion_answer": cc["choices"][0]["message"]["content"],
    }, ensure_ascii=False), flush=True)


# ------------------------------------------------------------- transformers
def bench_transformers(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    torch.set_num_threads(args.threads)
    path, gguf = args.model, args.gguf_file
    if path.endswith(".gguf"):
        path, gguf = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if gguf:   # GGUF: dequantized to f32 by transformers
        tokz = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        name = gguf
    else:      # HF folder; explicit Llama class so "AquilaForCausalLM" needs no remote code
        tokz = AutoTokenizer.from_pretrained(path)
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
        name = os.path.basename(os.path.normpath(path))
    model.eval()
    ids = fixed_prompt(lambda t: tokz(t, add_special_tokens=True)["input_ids"], args.prompt_tokens)
    input_ids = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(input_ids), do_sample=False,
              pad_token_id=tokz.eos_token_id if tokz.eos_token_id is not None else 0)

    def gen(n):
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t0
        assert out.shape[1] == len(ids) + n, out.shape
        return dt

    runs = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            gen(min(8, args.gen_tokens))   # warm-up
            t_p = gen(1)
            t_g = gen(args.gen_tokens)
            runs.append((len(ids) / t_p, (args.gen_tokens - 1) / (t_g - t_p)))
    report(args, "transformers", name, runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("llamacpp", "llamacpp-parallel", "transformers", "chat-llamacpp"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=2)
        if name == "transformers":
            p.add_argument("--model", required=True, help="HF folder, or a .gguf file")
            p.add_argument("--gguf-file", help="GGUF file name inside --model folder")
            p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                           help="weights and compute type for an HF folder (GGUF: always f32)")
        else:
            p.add_argument("--gguf", required=True)
        if name == "llamacpp-parallel":
            p.add_argument("--parallel", type=int, default=16, help="sequences decoded together")
        if name == "chat-llamacpp":
            p.add_argument("--max-tokens", type=int, default=32)
        else:
            p.add_argument("--prompt-tokens", type=int, default=40)
            p.add_argument("--gen-tokens", type=int, default=128)
            p.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    args = ap.parse_args()
    {"llamacpp": bench_llamacpp, "llamacpp-parallel": bench_llamacpp_parallel,
     "transformers": bench_transformers,
     "chat-llamacpp": chat_llamacpp}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
