//! Turning generated token ids into streamed text: incremental decoding that
//! never emits half a UTF-8 character, and stop sequences that may span
//! tokens (text that could be the start of a stop sequence is held back).

/// Decodes token ids to text (implemented by the tokenizer).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> String;
}

impl Decode for tokenizers::Tokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        // The inherent decode lives on the TokenizerImpl behind the Deref.
        (**self).decode(ids, true).unwrap_or_default()
    }
}

/// How a token changed the visible text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextDelta {
    /// Text safe to send now.
    pub text: String,
    /// The stop sequence found; generation must end.
    pub stop: Option<String>,
}

/// The text of one sequence's output, built token by token.
pub struct TextStream {
    ids: Vec<u32>,
    /// Ids before `prefix` only give context to the decoder (as in TGI's
    /// prefix/read offsets): text is taken from `read` on.
    prefix: usize,
    read: usize,
    /// Decoded text not yet sent (could start a stop sequence).
    pending: String,
    stops: Vec<String>,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            pending: String::new(),
            stops,
        }
    }

    /// Adds a generated token; returns the text that became safe to send.
    pub fn push(&mut self, token: u32, decoder: &dyn Decode) -> TextDelta {
        self.ids.push(token);
        let before = decoder.decode(&self.ids[self.prefix..self.read]);
        let after = decoder.decode(&self.ids[self.prefix..]);
        // An incomplete character decodes to U+FFFD: wait for the next token.
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') || !after.starts_with(&before)
        {
            return TextDelta::default();
        }
        self.pending.push_str(&after[before.len()..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        self.release()
    }

    /// Ends the stream: whatever is pending (a partial stop-sequence prefix
    /// or an incomplete character, decoded lossily) is sent.
    pub fn finish(&mut self, decoder: &dyn Decode) -> String {
        if self.read < self.ids.len() {
            let before = decoder.decode(&self.ids[self.prefix..self.read]);
            let after = decoder.decode(&self.ids[self.prefix..]);
            if let Some(rest) = after.strip_prefix(&before) {
                self.pending.push_str(rest);
            }
            self.read = self.ids.len();
        }
        std::mem::take(&mut self.pending)
    }

    fn release(&mut self) -> TextDelta {
        // Earliest stop sequence in what is pending.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, s)| (*at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return TextDelta {
                text,
                stop: Some(stop),
            };
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let text = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        TextDelta { text, stop: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one byte of UTF-8; ids >= 256 are multi-byte "words".
    struct Bytes;
    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| {
                    if i < 256 {
                        vec![i as u8]
                    } else {
                        format!("<{i}>").into_bytes()
                    }
                })
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn feed(stream: &mut TextStream, text: &str) -> (String, Option<String>) {
        let mut out = String::new();
        for b in text.bytes() {
            let d = stream.push(b as u32, &Bytes);
            out.push_str(&d.text);
            if d.stop.is_some() {
                return (out, d.stop);
            }
        }
        (out, None)
    }

    #[test]
    fn multibyte_characters_are_held_until_complete() {
        let mut s = TextStream::new(vec![]);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(s.push(euro[0] as u32, &Bytes).text, "");
        assert_eq!(s.push(euro[1] as u32, &Bytes).text, "");
        assert_eq!(s.push(euro[2] as u32, &Bytes).text, "€");
        assert_eq!(s.push(b'!' as u32, &Bytes).text, "!");
    }

    #[test]
    fn every_delta_is_valid_utf8_and_the_whole_text_survives() {
        let text = "naïve café — 日本語 🎉 done";
        let mut s = TextStream::new(vec![]);
        let (out, stop) = feed(&mut s, text);
        assert_eq!(stop, None);
        assert_eq!(out + &s.finish(&Bytes), text);
    }

    #[test]
    fn stop_sequence_spanning_tokens_ends_the_text_before_it() {
        let mut s = TextStream::new(vec!["END".into()]);
        let (out, stop) = feed(&mut s, "hello ENDworld");
        assert_eq!(out, "hello ");
        assert_eq!(stop.as_deref(), Some("END"));
    }

    #[test]
    fn a_partial_match_is_released_when_it_stops_matching() {
        let mut s = TextStream::new(vec!["END".into()]);
        let (out, stop) = feed(&mut s, "the ENigma");
        assert_eq!(stop, None);
        assert_eq!(out, "the ENigma");
    }

    #[test]
    fn held_back_prefix_is_flushed_at_finish() {
        let mut s = TextStream::new(vec!["\n\n".into()]);
        let (out, _) = feed(&mut s, "line\n");
        assert_eq!(out, "line");
        assert_eq!(s.finish(&Bytes), "\n");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = TextStream::new(vec!["cd".into(), "bcdx".into(), "c".into()]);
        let (out, stop) = feed(&mut s, "abcdx");
        assert_eq!(out, "ab");
        assert_eq!(stop.as_deref(), Some("c"));
    }

    #[test]
    fn stop_inside_a_multi_character_token() {
        let mut s = TextStream::new(vec!["<300>".into()]);
        s.push(b'a' as u32, &Bytes);
        let d = s.push(300, &Bytes);
        assert_eq!(d.stop.as_deref(), Some("<300>"));
    }
}
