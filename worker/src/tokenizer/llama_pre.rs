//! llama.cpp's byte-level BPE pre-tokenizers, by their GGUF name (`tokenizer.ggml.pre`), as
//! `tokenizers` components: each of llama.cpp's regexes becomes a `Split` that isolates its
//! matches (llama.cpp applies its regexes one after the other, each to the pieces the previous
//! ones left, keeping the text between matches as pieces too), then bytes become GPT-2's
//! printable characters.
//!
//! The regexes are the ones llama.cpp runs, which for some names differ from the model's own
//! `tokenizer.json` (llama.cpp rewrites case-insensitive groups, and its std::regex never
//! matches non-ASCII whitespace inside a literal character class: those classes leave it out
//! here too). Every name listed is checked against llama.cpp's ids by `tests/gguf_tokenizers.rs`;
//! a name that is not listed is refused, never approximated.

use tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;

/// How llama.cpp treats one family of `tokenizer.ggml.pre` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaPre {
    /// The regexes, in the order llama.cpp applies them.
    pub regexes: &'static [&'static str],
    /// A piece that is a whole vocabulary token is that token, whatever the merges say.
    pub ignore_merges: bool,
    /// Whether llama.cpp prepends bos when the GGUF has no `tokenizer.ggml.add_bos_token`.
    pub add_bos_default: bool,
    /// Whether llama.cpp's detokenizer removes the space before `?!.,` and some apostrophes
    /// (`clean_spaces`). We decode losslessly instead; the tests use this to compare.
    pub llama_clean_spaces: bool,
}

/// The GPT-2 regex as llama.cpp writes it for its own splitter (no trailing `\s+`: text
/// between matches stays a piece anyway, so the result is the same).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's regex with the case-insensitive contractions spelt out, as llama.cpp runs it.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken regex with llama.cpp's rewrite of `\p{Lu}…`/`\p{Ll}…` (which llama.cpp can
/// only tell apart for ASCII letters): "a letter that is not a-z" / "not A-Z".
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// CJK ranges of the DeepSeek regexes; U+0800..U+4E00 holds whitespace (U+1680, U+2000..,
/// U+3000), which llama.cpp never matches there, hence `&&\S`.
const DEEPSEEK_CJK: &str = r"[[一-龥ࠀ-一가-퟿]&&\S]+";

const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

const DEFAULT: LlamaPre = LlamaPre {
    regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    ignore_merges: false,
    add_bos_default: false,
    llama_clean_spaces: true,
};

const GPT2_FAMILY: LlamaPre = LlamaPre {
    regexes: &[GPT2],
    ..DEFAULT
};

const LLAMA3_FAMILY: LlamaPre = LlamaPre {
    regexes: &[LLAMA3],
    ignore_merges: true,
    add_bos_default: true,
    ..DEFAULT
};

const SMAUG: LlamaPre = LlamaPre {
    regexes: &[LLAMA3],
    ..DEFAULT
};

const DEEPSEEK_LLM: LlamaPre = LlamaPre {
    regexes: &[
        "[\r\n]",
        // Written as in DeepSeek's tokenizer.json; the `\x{…}` are characters that Unicode
        // normalization would change (Greek with oxia, the Ohm and Kelvin signs).
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        // `　-。` in the original: U+3000 is whitespace, which llama.cpp never matches there.
        r"\s?[!-/:-~！-／：-～‘-‟、-。]+",
        r"\s+$",
        DEEPSEEK_CJK,
        r"\p{N}+",
    ],
    llama_clean_spaces: false,
    ..DEFAULT
};

const DEEPSEEK_CODER: LlamaPre = LlamaPre {
    regexes: &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"],
    llama_clean_spaces: false,
    ..DEFAULT
};

const FALCON: LlamaPre = LlamaPre {
    regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
    ..DEFAULT
};

const STARCODER_FAMILY: LlamaPre = LlamaPre {
    regexes: &[r"\p{N}", GPT2],
    ..DEFAULT
};

const QWEN2_FAMILY: LlamaPre = LlamaPre {
    regexes: &[QWEN2],
    ..DEFAULT
};

const PORO_FAMILY: LlamaPre = LlamaPre {
    regexes: &[PORO],
    ..DEFAULT
};

/// The same treatment with llama.cpp's `clean_spaces` off.
const fn unclean(pre: LlamaPre) -> LlamaPre {
    LlamaPre {
        llama_clean_spaces: false,
        ..pre
    }
}

const VIKING: LlamaPre = LlamaPre {
    regexes: &[PORO, r"\p{N}"],
    llama_clean_spaces: false,
    ..DEFAULT
};

const TEKKEN_FAMILY: LlamaPre = LlamaPre {
    regexes: &[TEKKEN],
    ignore_merges: true,
    add_bos_default: true,
    llama_clean_spaces: false,
};

/// Every supported name and how llama.cpp treats it.
const TABLE: &[(&str, LlamaPre)] = &[
    ("default", DEFAULT),
    ("gpt-2", GPT2_FAMILY),
    ("phi-2", GPT2_FAMILY),
    ("mpt", GPT2_FAMILY),
    ("olmo", GPT2_FAMILY),
    ("jais", GPT2_FAMILY),
    ("llama3", LLAMA3_FAMILY),
    ("llama-v3", LLAMA3_FAMILY),
    ("llama-bpe", LLAMA3_FAMILY),
    ("falcon3", LLAMA3_FAMILY),
    ("smaug-bpe", SMAUG),
    ("dbrx", SMAUG),
    ("deepseek-llm", DEEPSEEK_LLM),
    ("deepseek-coder", DEEPSEEK_CODER),
    ("falcon", FALCON),
    ("starcoder", STARCODER_FAMILY),
    ("refact", STARCODER_FAMILY),
    ("smollm", unclean(STARCODER_FAMILY)),
    ("command-r", unclean(STARCODER_FAMILY)),
    ("codeshell", STARCODER_FAMILY),
    ("exaone", STARCODER_FAMILY),
    ("minerva-7b", STARCODER_FAMILY),
    ("qwen2", unclean(QWEN2_FAMILY)),
    ("deepseek-r1-qwen", unclean(QWEN2_FAMILY)),
    ("stablelm2", QWEN2_FAMILY),
    ("megrez", QWEN2_FAMILY),
    ("tekken", TEKKEN_FAMILY),
    ("poro-chat", unclean(PORO_FAMILY)),
    ("bloom", PORO_FAMILY),
    ("gpt3-finnish", PORO_FAMILY),
    ("viking", VIKING),
];

/// llama.cpp's treatment of `name`, if we support it.
pub fn lookup(name: &str) -> Option<LlamaPre> {
    TABLE.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}

/// The supported names, comma-separated, for error messages.
pub fn supported() -> String {
    TABLE.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Every supported name.
pub fn names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|(n, _)| *n)
}

impl LlamaPre {
    /// The `tokenizers` pre-tokenizer: one isolating `Split` per regex, then byte-level.
    pub fn pre_tokenizer(&self) -> Result<PreTokenizerWrapper, tokenizers::Error> {
        let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(self.regexes.len() + 1);
        for regex in self.regexes {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("regex {regex:?}: {e}"))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, true, false).into());
        Ok(Sequence::new(steps).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(name: &str, text: &str) -> Vec<String> {
        let pre = lookup(name).unwrap().pre_tokenizer().unwrap();
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(p, _, _)| p.to_owned())
            .collect()
    }

    #[test]
    fn every_regex_compiles() {
        for name in names() {
            let pre = lookup(name).unwrap();
            if let Err(e) = pre.pre_tokenizer() {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn splits_as_llama_cpp_does() {
        // Byte-level: a space is `Ġ`.
        assert_eq!(pieces("gpt-2", "Hi  you's"), ["Hi", "Ġ", "Ġyou", "'s"]);
        // Llama 3: digits in threes, a space before letters is its own piece when doubled.
        assert_eq!(pieces("llama-bpe", "a 12345"), ["a", "Ġ", "123", "45"]);
        // smollm/starcoder: every digit alone.
        assert_eq!(pieces("smollm", "x 123"), ["x", "Ġ", "1", "2", "3"]);
        // default: punctuation runs first, so contractions split at the apostrophe.
        assert_eq!(pieces("default", "don't"), ["don", "'", "t"]);
    }

    #[test]
    fn deepseek_cjk_class_leaves_out_whitespace() {
        // U+3000 is whitespace: not part of a CJK run.
        let p = pieces("deepseek-coder", "你好\u{3000}世界");
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn unknown_names_are_not_found() {
        assert!(lookup("no-such-pre").is_none());
        assert!(supported().contains("llama-bpe"));
    }
}
