"""GGUF tokenizer fixtures and llama.cpp's ids for them (tests/gguf_tokenizers.rs).

Usage: gguf_tokenizers.py OUT_DIR

Writes into OUT_DIR:
  - SentencePiece (`llama`) GGUFs made from a small BPE model trained here with the
    `sentencepiece` package on the corpus below, in variants (no space prefix, no bos,
    no tokenizer flags at all);
  - byte-level BPE (`gpt2`) GGUFs, one per `tokenizer.ggml.pre` value, from the real Aquila
    vocabulary ($AQUILA_TOKENIZER_DIR; left out when unset) - the whole of it for one
    pre-tokenizer of each kind, its first 12,000 tokens for the aliases;
  - reference.json: for every fixture and every text in TEXTS, the ids llama.cpp gives
    (`llama_tokenize`, with and without add_special, parse_special on, as the gateway treats
    control-token strings in prompts as tokens) and its detokenized text. The demo model
    ($AQUILA_DEMO_MODEL) is tokenized too when set.

The reference is llama.cpp's C API from the `llama-cpp-cffi` wheel (its CPU build), or from
`llama_cpp` (llama-cpp-python) when the wheel is not installed. No file is downloaded here.
Everything is deterministic: the same inputs give the same files and ids.
"""

import ctypes
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import sys

import gguf
import sentencepiece as spm

# Token texts llama.cpp may recognise as control tokens whatever their type. Each group is
# added, untyped, to a fixture of its own (llama.cpp marks only the first fill-in-the-middle
# token it finds of each kind, so a group holds one of each).
CONTROL_PROBES = {
    "eog": [
        "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>", "<EOT>", "_<EOT>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|end_of_text|>", "<end_of_utterance>",
        "<|return|>",
    ],
    "fim-qwen": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|fim_repo|>", "<|file_sep|>"],
    "fim-codellama": ["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"],
    "fim-deepseek": ["<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"],
    "fim-hyphen": ["<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>", "<fim-repo>"],
    "fim-plain": ["<PRE>", "<SUF>", "<MID>", "<PAD>", "<REPO>"],
    "fim-underscore": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<reponame>"],
    "fim-repo-name": ["<|repo_name|>"],
}


# Texts every fixture is tokenized on: Unicode, digits, whitespace runs, code, CJK,
# contractions, control-token strings, and the empty string.
TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " Hello world",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "   ",
    "\n",
    "\n\n\nthree newlines",
    "line one\nline two\n",
    "\tTab\tseparated\tvalues\t",
    "mixed \t \n whitespace\r\n windows line",
    "spaces   in    between     words",
    "x" + " " * 17 + "y",
    # Whitespace runs of many lengths: the SentencePiece fixture's tied whitespace pieces.
    "".join(f"w{n}" + " " * n for n in (2, 3, 4, 5, 7, 8, 9, 15, 16, 18, 24, 31, 32, 40)),
    "\n".join(" " * n + "x" for n in (1, 2, 3, 6, 10, 17, 23)),
    " " * 33 + "deep indent",
    "a\u00a0b nbsp, c\u3000d ideographic, e\u2009f thin, g\u0085h nel, i\x0bj vt, k\x0cl ff",
    "1234567890",
    "3.14159 and 2,718 and 1e-10",
    "x=123456789012345; y=007",
    "Arabic-Indic ٣٤٥ and fullwidth １２３ and superscript x² ½ ①",
    "I'm sure you'll see they've done it, isn't it? We'd've known.",
    "DON'T SHOUT, I'M HERE, WE'LL SEE",
    "it's 'quoted' and ' alone '",
    "café naïve résumé façade Ærøskøbing",
    "e\u0301 combining, n\u0303o, Z\u0351\u0332algo",
    "emoji 😀👍🏽👨‍👩‍👧 and ❤️ flags 🇫🇷",
    "עברית שלום עולם",
    "مرحبا بالعالم ١٢٣",
    "Ελληνικά και Русский текст, Привет мир!",
    "你好，世界！这是一个测试。",
    "日本語のテキストです。カタカナとひらがな",
    "한국어 텍스트입니다. 안녕하세요",
    "中文English混合123测试",
    "你好　世界。。　。",
    "def square(x):\n    return x ** 2  # square it\n",
    'fn main() {\n\tprintln!("{}", 42);\n}\n',
    "if (a && b || !c) { x += 1; } else { y -= 2; }",
    '<div class="a">&amp;&lt;</div>',
    "SELECT * FROM users WHERE id=1 AND name='bob';",
    "path/to/file.rs:12:5: error[E0308]: mismatched types",
    "Hello , world . What ? Really !",
    "Wait... really?! Yes!!! ~tilde ^caret |pipe `tick` $dollar +plus <less> =eq",
    "a ' b 's c 'll d 're e 've f 'm g 't",
    "<s>Hello</s>",
    "<unk> unknown",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>Next document",
    "[CLS] first [MASK] second </s>",
    "tool call: <|tool|>{\"a\": 1}<|tool|> and @@ marks @@",
    "The quick brown fox jumps over the lazy dog. 1984 was 40 years ago.",
    "Unseen characters: ʘ ǂ ᚠ ꙮ 𝔘𝔫𝔦 ∮ ⌘ ☃ and private use \ue000",
    "ASCII separators a\x1cb\x1dc\x1ed\x1fe and NUL \x00 and DEL \x7f",
    "ask qwertyuiop now",
] + [" ".join(group) for group in CONTROL_PROBES.values()]

# Training text for the SentencePiece fixture: several scripts, code, digits and whitespace.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello world! Hello, world. How are you today? I'm fine, thanks; you'll see that they've done it.
It isn't what we'd expected, but it's what we've got. Don't worry, be happy.
Tokenizers split text into pieces; a model reads the pieces as numbers.
In 1984 there were 365 days, 52 weeks and 12 months; 3.14159 is close to pi, 2.71828 to e.
Call 555-0123 before 10:30 or after 18:45. The price is $19.99 (plus 7% tax).
Le café est très bon. Naïve résumé, façade, élève, Noël, où, déjà vu. Ça va très bien, merci.
Die Straße ist schön. Grüße aus München, Köln und Düsseldorf. Über alles, ähnlich, Öl.
El niño comió una manzana. ¿Dónde está la biblioteca? ¡Qué sorpresa! Mañana será otro día.
Привет, мир! Как дела? Русский язык очень богатый. Москва, Санкт-Петербург.
Ελληνικά: Καλημέρα κόσμε. Η γλώσσα είναι όμορφη.
עברית: שלום עולם, מה שלומך? בוקר טוב.
العربية: مرحبا بالعالم، كيف حالك؟ صباح الخير.
你好，世界！这是一个测试。我们正在训练一个分词器。中文文本需要更多的字符。
今天天气很好，我们去公园散步吧。人工智能和机器学习是现在的热门话题。
日本語のテキストです。カタカナとひらがなと漢字。東京は日本の首都です。
한국어 텍스트입니다. 안녕하세요, 만나서 반갑습니다. 서울은 한국의 수도입니다.
def square(x):
    return x ** 2  # square it

def main(argv):
    for i in range(10):
        if i % 2 == 0:
            print(f"{i} is even")
        else:
            print(f"{i} is odd")
    return 0

fn main() {
    let v: Vec<u32> = (0..10).collect();
    println!("{:?}", v);
}

int main(int argc, char **argv) {
	if (argc > 1 && argv[1] != NULL) {
		printf("%s\\n", argv[1]);
	}
	return 0;
}
SELECT id, name FROM users WHERE id = 1 AND name = 'bob' ORDER BY name;
<div class="container"><p>Hello &amp; welcome</p></div>
{"key": "value", "list": [1, 2, 3], "nested": {"a": true, "b": null}}
path/to/file.rs:12:5: error[E0308]: mismatched types
    indented line with four spaces
        eight spaces of indentation here
            twelve spaces of indentation here
                sixteen spaces of indentation here
"""


def corpus_lines():
    lines = [l for l in CORPUS.split("\n") if l.strip()]
    # Numbers and identifiers, so digits and code-like pieces get merges.
    for i in range(200):
        lines.append(f"item_{i} = {i * 37 % 1000} + {i * i} # value {i} of list_{i % 7}")
    return lines


def load_llama():
    """llama.cpp's C API: (lib, ffi, description)."""
    spec = importlib.util.find_spec("llama")
    if spec is not None and spec.submodule_search_locations:
        folder = list(spec.submodule_search_locations)[0]
        names = [f for f in os.listdir(folder) if f.startswith("_llama_cpp_cpu") and f.endswith(".so")]
        if names:
            path = os.path.join(folder, names[0])
            # The wheel is built against a newer libstdc++ than Debian 12's; the one symbol it
            # lacks (__cxa_call_terminate) is called only when a noexcept function throws, so
            # binding lazily lets it load.
            sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
            loader = importlib.machinery.ExtensionFileLoader("_llama_cpp_cpu", path)
            mspec = importlib.util.spec_from_loader("_llama_cpp_cpu", loader)
            module = importlib.util.module_from_spec(mspec)
            loader.exec_module(module)
            handle = ctypes.CDLL(path, os.RTLD_LAZY)
            build = ctypes.c_int.in_dll(handle, "LLAMA_BUILD_NUMBER").value
            commit = ctypes.c_char_p.in_dll(handle, "LLAMA_COMMIT").value.decode()
            dist = importlib.metadata.version("llama-cpp-cffi")
            return CffiLlama(module.lib, module.ffi), f"llama-cpp-cffi {dist} (llama.cpp b{build}, commit {commit})"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("neither llama-cpp-cffi nor llama-cpp-python is installed (tests/run.sh installs the first)")
    return CtypesLlama(), f"llama-cpp-python {llama_cpp.__version__}"


class CffiLlama:
    def __init__(self, lib, ffi):
        self.lib, self.ffi = lib, ffi
        self.log = []

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def on_log(level, text, _user):
            self.log.append(ffi.string(text).decode("utf-8", "replace"))

        self._on_log = on_log
        lib.llama_log_set(on_log, ffi.NULL)
        lib.llama_backend_init()

    def load(self, path):
        self.log.clear()
        params = self.lib.llama_model_default_params()
        params.vocab_only = True
        model = self.lib.llama_model_load_from_file(path.encode(), params)
        if model == self.ffi.NULL:
            return None
        return model

    def free(self, model):
        self.lib.llama_model_free(model)

    def info(self, model):
        v = self.lib.llama_model_get_vocab(model)
        return {
            "n_tokens": self.lib.llama_vocab_n_tokens(v),
            "bos": self.lib.llama_vocab_bos(v),
            "eos": self.lib.llama_vocab_eos(v),
            "add_bos": bool(self.lib.llama_vocab_get_add_bos(v)),
            "add_eos": bool(self.lib.llama_vocab_get_add_eos(v)),
        }

    def tokenize(self, model, text, add_special):
        v = self.lib.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = self.ffi.new("llama_token[]", cap)
        n = self.lib.llama_tokenize(v, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = self.ffi.new("llama_token[]", cap)
            n = self.lib.llama_tokenize(v, data, len(data), buf, cap, add_special, True)
        return [buf[i] for i in range(n)]

    def detokenize(self, model, ids, unparse_special):
        v = self.lib.llama_model_get_vocab(model)
        toks = self.ffi.new("llama_token[]", ids or [0])
        cap = 16 + 64 * len(ids)
        out = self.ffi.new("char[]", cap)
        n = self.lib.llama_detokenize(v, toks, len(ids), out, cap, False, unparse_special)
        return self.ffi.unpack(out, n).decode("utf-8", "replace")


class CtypesLlama:
    """The same calls through llama-cpp-python's ctypes bindings."""

    def __init__(self):
        import llama_cpp as lc

        self.lc = lc
        self.log = []
        lc.llama_backend_init()

    def load(self, path):
        params = self.lc.llama_model_default_params()
        params.vocab_only = True
        model = self.lc.llama_model_load_from_file(path.encode(), params)
        return model or None

    def free(self, model):
        self.lc.llama_model_free(model)

    def info(self, model):
        v = self.lc.llama_model_get_vocab(model)
        return {
            "n_tokens": self.lc.llama_vocab_n_tokens(v),
            "bos": self.lc.llama_vocab_bos(v),
            "eos": self.lc.llama_vocab_eos(v),
            "add_bos": bool(self.lc.llama_vocab_get_add_bos(v)),
            "add_eos": bool(self.lc.llama_vocab_get_add_eos(v)),
        }

    def tokenize(self, model, text, add_special):
        v = self.lc.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self.lc.llama_token * cap)()
        n = self.lc.llama_tokenize(v, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (self.lc.llama_token * cap)()
            n = self.lc.llama_tokenize(v, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])

    def detokenize(self, model, ids, unparse_special):
        v = self.lc.llama_model_get_vocab(model)
        toks = (self.lc.llama_token * max(1, len(ids)))(*ids)
        cap = 16 + 64 * len(ids)
        out = ctypes.create_string_buffer(cap)
        n = self.lc.llama_detokenize(v, toks, len(ids), out, cap, False, unparse_special)
        return out.raw[:n].decode("utf-8", "replace")


def tiny_llama_header(w):
    """The llama hyper-parameters llama.cpp reads before a vocab-only load; no tensors."""
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)


def write_gguf(path, fill):
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(os.path.basename(path))
    tiny_llama_header(w)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- SentencePiece -------------------------------------------------------------------------

# Whitespace-run pieces of 2..16 `▁`, all with one very low score, as Llama-2's vocabulary has
# them: ties that llama.cpp breaks by position.
WHITESPACE_RUNS = ["\u2581" * k for k in range(2, 17)]
WHITESPACE_SCORE = -1e9


def train_spm():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=2000,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=["<|tool|>", "@@"],
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    user_defined = {"<|tool|>", "@@"}
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif piece in user_defined:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for run in WHITESPACE_RUNS:
        if run in tokens:
            scores[tokens.index(run)] = WHITESPACE_SCORE
        else:
            tokens.append(run)
            scores.append(WHITESPACE_SCORE)
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def spm_fixtures(out, tokens, scores, types):
    variants = {
        "spm": dict(add_bos=True, add_space_prefix=True, keys=True),
        "spm-no-space-prefix": dict(add_bos=True, add_space_prefix=False, keys=True),
        "spm-no-bos": dict(add_bos=False, add_space_prefix=True, keys=True),
        # No bos/eos/unk ids and no flags: llama.cpp's defaults (1, 2, 0; bos and prefix on).
        "spm-defaults": dict(add_bos=None, add_space_prefix=None, keys=False),
    }
    fixtures = []
    for name, v in variants.items():
        path = os.path.join(out, name + ".gguf")

        def fill(w, v=v):
            w.add_tokenizer_model("llama")
            w.add_token_list(tokens)
            w.add_token_scores([float(s) for s in scores])
            w.add_token_types([int(t) for t in types])
            if v["keys"]:
                w.add_unk_token_id(0)
                w.add_bos_token_id(1)
                w.add_eos_token_id(2)
                w.add_add_bos_token(v["add_bos"])
                w.add_add_eos_token(False)
                w.add_add_space_prefix(v["add_space_prefix"])

        write_gguf(path, fill)
        fixtures.append({"name": name, "path": path, "model": "llama", "pre": None})
    return fixtures


# --- byte-level BPE ------------------------------------------------------------------------

# Every `tokenizer.ggml.pre` value the loader supports gets the first 3,000 tokens of the Aquila
# vocabulary (with their merges: enough for the pieces to show in the ids); the most used ones
# get all of it too. (Writing 100,000 tokens with the gguf package takes a second per file.)
PRE_FULL = ["llama-bpe"]
PRE_SMALL = [
    "gpt-2", "llama-bpe", "deepseek-llm", "default", "phi-2", "mpt", "olmo", "jais", "llama3", "llama-v3", "falcon3", "smaug-bpe",
    "dbrx", "deepseek-coder", "falcon", "starcoder", "refact", "smollm", "command-r", "codeshell",
    "exaone", "minerva-7b", "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "tekken",
    "poro-chat", "bloom", "gpt3-finnish", "viking",
]
SMALL_VOCAB = 3000
EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>"]
# A token no merge makes: found whole only where llama.cpp ignores merges for whole pieces.
WHOLE_WORD = "\u0120qwertyuiop"


def read_aquila(folder):
    vocab = json.load(open(os.path.join(folder, "vocab.json.llama.cpp"), encoding="utf-8"))
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    return sorted(vocab.items(), key=lambda kv: kv[1]), merges


def aquila_vocab(aquila, limit=None):
    """Tokens (the first `limit` of Aquila's, its specials, ours), their merges and types."""
    by_id, all_merges = aquila
    specials = [t for t, i in by_id if i >= 100000] + ["<|endoftext|>"]
    tokens = [t for t, i in by_id if i < 100000]
    if limit is not None:
        tokens = tokens[:limit]
    keep = set(tokens)
    tokens += [t for t, i in by_id if i >= 100000]
    tokens += EXTRA_SPECIALS + [WHOLE_WORD]
    merges = []
    for line in all_merges:
        a, b = line.split(" ", 1)
        if a in keep and b in keep and a + b in keep:
            merges.append(line)
    types = [
        int(gguf.TokenType.CONTROL if t in specials or t in EXTRA_SPECIALS else gguf.TokenType.NORMAL)
        for t in tokens
    ]
    return tokens, merges, types


def bpe_fixtures(out, folder):
    aquila = read_aquila(folder)
    full = aquila_vocab(aquila)
    small = aquila_vocab(aquila, SMALL_VOCAB)
    fixtures = []

    def add(name, pre, vocab, typed=True, add_bos=None, extra=()):
        tokens, merges, types = vocab
        tokens = tokens + list(extra)
        path = os.path.join(out, name + ".gguf")

        def fill(w):
            w.add_tokenizer_model("gpt2")
            if pre is not None:
                w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            if typed:
                w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_bos_token_id(tokens.index("[CLS]"))
            w.add_eos_token_id(tokens.index("</s>"))
            if add_bos is not None:
                w.add_add_bos_token(add_bos)

        write_gguf(path, fill)
        fixtures.append({"name": name, "path": path, "model": "gpt2", "pre": pre})

    for pre in PRE_FULL:
        add("bpe-" + pre, pre, full)
    for pre in PRE_SMALL:
        add("bpe-small-" + pre, pre, small)
    add("bpe-no-pre", None, small)
    add("bpe-gpt-2-add-bos", "gpt-2", small, add_bos=True)
    # No token types: llama.cpp types every token normal, then marks end-of-generation-looking
    # ones (<|endoftext|>, <|im_end|>...) as control.
    for group, probes in CONTROL_PROBES.items():
        add("bpe-gpt-2-untyped-" + group, "gpt-2", small, typed=False, extra=probes)
    # Refused by llama.cpp as by us.
    add("bpe-unknown-pre", "no-such-pre", small)
    return fixtures


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    llama, reference = load_llama()

    fixtures = spm_fixtures(out, *train_spm())
    if os.environ.get("AQUILA_TOKENIZER_DIR"):
        fixtures += bpe_fixtures(out, os.environ["AQUILA_TOKENIZER_DIR"])
    if os.environ.get("AQUILA_DEMO_MODEL"):
        fixtures.append({"name": "demo-smollm", "path": os.environ["AQUILA_DEMO_MODEL"], "model": "gpt2", "pre": "smollm"})

    for fx in fixtures:
        model = llama.load(fx["path"])
        if model is None:
            fx["load_error"] = " ".join(l.strip() for l in llama.log if "error" in l.lower() or "unknown" in l.lower())
            continue
        fx["load_error"] = None
        fx.update(llama.info(model))
        fx["warnings"] = [l.strip() for l in llama.log if "missing pre-tokenizer" in l]
        cases = []
        for text in TEXTS:
            ids = llama.tokenize(model, text, False)
            cases.append({
                "text": text,
                "ids": ids,
                "ids_add_special": llama.tokenize(model, text, True),
                "detokenized": llama.detokenize(model, ids, True),
                "detokenized_plain": llama.detokenize(model, ids, False),
            })
        fx["cases"] = cases
        llama.free(model)

    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"reference": reference, "fixtures": fixtures}, f, ensure_ascii=False, indent=1)
    print(reference)


if __name__ == "__main__":
    main()
