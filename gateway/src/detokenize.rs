//! Incremental detokenization: generated ids in, text deltas out.
//!
//! Uses the prefix/read-offset method: the text of `ids[prefix..read]` has
//! already been emitted; decoding `ids[prefix..]` and taking the difference
//! gives the new text. A delta is emitted only when it is complete, i.e. the
//! text grew and does not end with U+FFFD (a character whose bytes are still
//! arriving over several byte-level tokens). Decoding a few tokens of context
//! keeps decoders that strip a leading space (SentencePiece) correct
//! mid-sequence. This module never decides when generation stops.

use tokenizers::Tokenizer;

/// Prompt tokens decoded as context before the first generated token.
const CONTEXT_TOKENS: usize = 5;

pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl Detokenizer {
    /// `prompt` gives context only; its text is never emitted.
    pub fn new(prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Detokenizer {
            ids: context.to_vec(),
            prefix: 0,
            read: context.len(),
        }
    }

    /// Adds one generated token; returns the text it completes (often "").
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, tokenizers::Error> {
        self.ids.push(id);
        let emitted = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix..], true)?;
        if text.len() > emitted.len() && !text.ends_with('\u{FFFD}') {
            let delta = text[boundary_at_or_below(&text, emitted.len())..].to_owned();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text held back at the end of generation (an incomplete character
    /// comes out as U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, tokenizers::Error> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let emitted = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        if text.len() > emitted.len() {
            Ok(text[boundary_at_or_below(&text, emitted.len())..].to_owned())
        } else {
            Ok(String::new())
        }
    }
}

/// The text of one token alone, as logprobs show it: the decoded text when it
/// is whole UTF-8, otherwise the vocabulary piece.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    match tokenizer.decode(&[id], false) {
        Ok(text) if !text.contains('\u{FFFD}') => text,
        _ => tokenizer.id_to_token(id).unwrap_or_default(),
    }
}

/// Decoding a longer window may change earlier text (cleanup rules); never
/// slice inside a character.
fn boundary_at_or_below(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel as ByteLevelPre;
    use tokenizers::{AddedToken, Tokenizer};

    /// A byte-level BPE with one token per byte (id = byte value) and no
    /// merges, plus `<eos>` = 256 as a special token: every multi-byte
    /// character takes several tokens.
    pub(crate) fn byte_tokenizer() -> Tokenizer {
        let vocab: [(String, u32); 256] =
            std::array::from_fn(|b| (byte_char(b as u8).to_string(), b as u32));
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevelPre::new(false, true, false)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer
            .add_special_tokens([AddedToken::from("<eos>", true)])
            .unwrap();
        tokenizer
    }

    /// GPT-2's bytes_to_unicode table.
    fn byte_char(b: u8) -> char {
        if is_printable(b) {
            return char::from(b);
        }
        // Unprintable bytes map, in order, to 256, 257, ...
        let rank = (0..b).filter(|&x| !is_printable(x)).count() as u32;
        char::from_u32(256 + rank).unwrap()
    }

    fn is_printable(b: u8) -> bool {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    }

    pub(crate) fn ids_of(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn byte_tokenizer_is_one_token_per_byte() {
        let tokenizer = byte_tokenizer();
        assert_eq!(ids_of(&tokenizer, "中"), [0xE4, 0xB8, 0xAD]);
        assert_eq!(
            ids_of(&tokenizer, "a b"),
            [b'a' as u32, b' ' as u32, b'b' as u32]
        );
    }

    #[test]
    fn chinese_character_is_emitted_whole() {
        let tokenizer = byte_tokenizer();
        let mut detok = Detokenizer::new(&[]);
        let deltas: Vec<String> = ids_of(&tokenizer, "中")
            .into_iter()
            .map(|id| detok.push(&tokenizer, id).unwrap())
            .collect();
        assert_eq!(deltas, ["", "", "中"]);
        assert_eq!(detok.flush(&tokenizer).unwrap(), "");
    }

    #[test]
    fn deltas_concatenate_to_the_text_and_skip_specials() {
        let tokenizer = byte_tokenizer();
        let prompt = ids_of(&tokenizer, "Q: 北京?");
        let mut detok = Detokenizer::new(&prompt);
        let mut ids = ids_of(&tokenizer, " 有 fun, 好玩!");
        ids.push(256);
        let mut text = String::new();
        for id in ids {
            let delta = detok.push(&tokenizer, id).unwrap();
            assert!(!delta.contains('\u{FFFD}'));
            text.push_str(&delta);
        }
        text.push_str(&detok.flush(&tokenizer).unwrap());
        assert_eq!(text, " 有 fun, 好玩!");
    }

    #[test]
    fn flush_releases_an_incomplete_character() {
        let tokenizer = byte_tokenizer();
        let mut detok = Detokenizer::new(&[]);
        assert_eq!(detok.push(&tokenizer, u32::from(b'a')).unwrap(), "a");
        assert_eq!(detok.push(&tokenizer, 0xE4).unwrap(), "");
        assert_eq!(detok.flush(&tokenizer).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn token_text_falls_back_to_the_piece() {
        let tokenizer = byte_tokenizer();
        assert_eq!(token_text(&tokenizer, u32::from(b'a')), "a");
        assert_eq!(token_text(&tokenizer, 0xE4), byte_char(0xE4).to_string());
        assert_eq!(token_text(&tokenizer, 256), "<eos>");
    }
}
