//! Stop strings over streamed text.
//!
//! Text arrives in deltas; a stop string may span several of them. The
//! matcher emits only text that can no longer be the start of a stop string,
//! holding back the longest suffix that is a prefix of one, so a stop string
//! (which is trimmed from the output) is never partly sent. It works on text
//! only: it does not know about tokens or the worker.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; this text is safe to send.
    Continue(String),
    /// `text` comes before the match and is the last text to send;
    /// `stop` indexes the stop strings given to [`StopMatcher::new`].
    Matched { text: String, stop: usize },
}

#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored (validation rejects them anyway).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    pub fn stop_string(&self, index: usize) -> &str {
        self.stops
            .get(index)
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.pending.push_str(delta);
        if let Some((at, stop)) = self.earliest_match() {
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(at);
            return StopOutcome::Matched { text, stop };
        }
        let hold = self.held_suffix_len();
        let rest = self.pending.split_off(self.pending.len() - hold);
        StopOutcome::Continue(std::mem::replace(&mut self.pending, rest))
    }

    /// Releases the held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// The earliest position any stop string occurs at; on a tie, the
    /// first stop string listed.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i)))
            .min()
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of
    /// some stop string. Always a character boundary of `pending`, since that
    /// suffix equals a (valid UTF-8) prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for k in (hold + 1..stop.len()).rev() {
                if stop.is_char_boundary(k) && self.pending.ends_with(&stop[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn cont(text: &str) -> StopOutcome {
        StopOutcome::Continue(text.to_owned())
    }

    #[test]
    fn no_stop_strings_passes_everything_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("abc"), cont("abc"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn match_inside_one_delta_trims_the_stop_string() {
        let mut m = matcher(&["###"]);
        assert_eq!(
            m.push("Paris.###Human"),
            StopOutcome::Matched {
                text: "Paris.".into(),
                stop: 0
            }
        );
    }

    #[test]
    fn stop_string_spanning_three_deltas() {
        let mut m = matcher(&["<|im_end|>"]);
        assert_eq!(m.push("Hello <|im"), cont("Hello "));
        assert_eq!(m.push("_en"), cont(""));
        assert_eq!(
            m.push("d|> tail"),
            StopOutcome::Matched {
                text: String::new(),
                stop: 0
            }
        );
    }

    #[test]
    fn false_partial_match_is_released() {
        let mut m = matcher(&["###"]);
        assert_eq!(m.push("a #"), cont("a "));
        assert_eq!(m.push("#"), cont(""));
        assert_eq!(m.push(" b"), cont("## b"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST"), cont("go "));
        assert_eq!(m.finish(), "ST");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(
            m.push("hello world"),
            StopOutcome::Matched {
                text: "hel".into(),
                stop: 1
            }
        );
        assert_eq!(m.stop_string(1), "lo");
    }

    #[test]
    fn longest_held_prefix_across_stop_strings() {
        let mut m = matcher(&["ab", "xabc"]);
        // "xab" is a prefix of "xabc" but "ab" matches fully first.
        assert_eq!(
            m.push("1xab"),
            StopOutcome::Matched {
                text: "1x".into(),
                stop: 0
            }
        );
        let mut m = matcher(&["abc", "bcd"]);
        assert_eq!(m.push("zab"), cont("z"));
        assert_eq!(
            m.push("cd"),
            StopOutcome::Matched {
                text: String::new(),
                stop: 0
            }
        );
    }

    #[test]
    fn multibyte_stop_strings_hold_whole_characters() {
        let mut m = matcher(&["。结束"]);
        assert_eq!(m.push("好。"), cont("好"));
        assert_eq!(m.push("结"), cont(""));
        assert_eq!(m.push("果"), cont("。结果"));
    }
}
