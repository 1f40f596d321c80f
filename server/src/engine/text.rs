//! Turning generated token ids into streamed text: incremental decoding that
//! never emits half a UTF-8 character, and stop sequences that may span
//! tokens (text that could be the start of a stop sequence is held back).
//! The decoder sees the prompt's last tokens first, as in TGI and vLLM:
//! SentencePiece decoders drop the space of a window's first token, so a
//! window that starts at the first generated token would lose its space.

/// Prompt tokens decoded before the first generated one (vLLM's
/// `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
const PROMPT_CONTEXT: usize = 5;

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
    /// A stream whose decoder starts with the last tokens of `prompt` as
    /// context (their text is not part of the output).
    pub fn new(stops: Vec<String>, prompt: &[u32], decoder: &dyn Decode) -> Self {
        let mut ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        // A context that ends inside a character would hold every later
        // token back: then start without one.
        if decoder.decode(&ids).ends_with('\u{FFFD}') {
            ids.clear();
        }
        Self {
            prefix: 0,
            read: ids.len(),
            ids,
            pending: String::new(),
            stops,
        }
    }

    /// The text each of `tokens` would add if it came next (for the
    /// alternatives of log-probabilities); a token that would not end a
    /// character is decoded alone.
    pub fn next_texts(&self, tokens: &[u32], decoder: &dyn Decode) -> Vec<String> {
        let mut window = self.ids[self.prefix..].to_vec();
        let before = decoder.decode(&window);
        tokens
            .iter()
            .map(|&token| {
                window.push(token);
                let after = decoder.decode(&window);
                window.pop();
                match after.strip_prefix(before.as_str()) {
                    Some(text) if !text.ends_with('\u{FFFD}') => text.to_string(),
                    _ => decoder.decode(&[token]),
                }
            })
            .collect()
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

    fn stream(stops: Vec<String>) -> TextStream {
        TextStream::new(stops, &[], &Bytes)
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
        let mut s = stream(vec![]);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(s.push(euro[0] as u32, &Bytes).text, "");
        assert_eq!(s.push(euro[1] as u32, &Bytes).text, "");
        assert_eq!(s.push(euro[2] as u32, &Bytes).text, "€");
        assert_eq!(s.push(b'!' as u32, &Bytes).text, "!");
    }

    #[test]
    fn every_delta_is_valid_utf8_and_the_whole_text_survives() {
        let text = "naïve café — 日本語 🎉 done";
        let mut s = stream(vec![]);
        let (out, stop) = feed(&mut s, text);
        assert_eq!(stop, None);
        assert_eq!(out + &s.finish(&Bytes), text);
    }

    #[test]
    fn stop_sequence_spanning_tokens_ends_the_text_before_it() {
        let mut s = stream(vec!["END".into()]);
        let (out, stop) = feed(&mut s, "hello ENDworld");
        assert_eq!(out, "hello ");
        assert_eq!(stop.as_deref(), Some("END"));
    }

    #[test]
    fn a_partial_match_is_released_when_it_stops_matching() {
        let mut s = stream(vec!["END".into()]);
        let (out, stop) = feed(&mut s, "the ENigma");
        assert_eq!(stop, None);
        assert_eq!(out, "the ENigma");
    }

    #[test]
    fn held_back_prefix_is_flushed_at_finish() {
        let mut s = stream(vec!["\n\n".into()]);
        let (out, _) = feed(&mut s, "line\n");
        assert_eq!(out, "line");
        assert_eq!(s.finish(&Bytes), "\n");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = stream(vec!["cd".into(), "bcdx".into(), "c".into()]);
        let (out, stop) = feed(&mut s, "abcdx");
        assert_eq!(out, "ab");
        assert_eq!(stop.as_deref(), Some("c"));
    }

    #[test]
    fn stop_inside_a_multi_character_token() {
        let mut s = stream(vec!["<300>".into()]);
        s.push(b'a' as u32, &Bytes);
        let d = s.push(300, &Bytes);
        assert_eq!(d.stop.as_deref(), Some("<300>"));
    }
}

/// A SentencePiece tokenizer as Llama 2, TinyLlama and Mistral ship it
/// (Metaspace: "▁" marks a space, the first one of a text is dropped).
#[cfg(test)]
mod sentencepiece {
    use super::*;
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::Tokenizer;

    fn tokenizer() -> Tokenizer {
        let vocab = [
            "<unk>", "<s>", "</s>", "▁The", "▁cat", "▁sat", "▁on", "▁mat", "s", ".",
        ];
        let scored = vocab.iter().map(|t| (t.to_string(), -1.0)).collect();
        let model = Unigram::from(scored, Some(0), false).unwrap();
        let mut t = Tokenizer::new(model);
        let metaspace = Metaspace::new('▁', PrependScheme::First, true);
        t.with_pre_tokenizer(Some(metaspace.clone()));
        t.with_decoder(Some(metaspace));
        t.add_special_tokens(&[
            tokenizers::AddedToken::from("<s>", true),
            tokenizers::AddedToken::from("</s>", true),
        ]);
        t
    }

    fn id(t: &Tokenizer, token: &str) -> u32 {
        t.token_to_id(token).unwrap()
    }

    #[test]
    fn the_first_generated_token_keeps_its_space() {
        let t = tokenizer();
        // Decoding "▁sat" alone gives "sat": the decoder drops a text's first space.
        assert_eq!(Decode::decode(&t, &[id(&t, "▁sat")]), "sat");
        let prompt: Vec<u32> = vec![id(&t, "<s>"), id(&t, "▁The"), id(&t, "▁cat")];
        let mut s = TextStream::new(vec![], &prompt, &t);
        let output = ["▁sat", "▁on", "▁The", "▁mat", "s", "."].map(|token| id(&t, token));
        let mut out = String::new();
        for token in output {
            let delta = s.push(token, &t);
            assert_eq!(delta.stop, None);
            out.push_str(&delta.text);
        }
        out.push_str(&s.finish(&t));
        assert_eq!(out, " sat on The mats.");
        // The same text as decoding prompt and output together, less the prompt's.
        let whole: Vec<u32> = prompt.iter().chain(&output).copied().collect();
        assert_eq!(format!("The cat{out}"), Decode::decode(&t, &whole));
    }

    #[test]
    fn a_prompt_of_only_special_tokens_gives_no_context() {
        let t = tokenizer();
        let mut s = TextStream::new(vec![], &[id(&t, "<s>")], &t);
        // Like transformers' decode of the output alone: no leading space.
        assert_eq!(s.push(id(&t, "▁The"), &t).text, "The");
        assert_eq!(s.push(id(&t, "▁cat"), &t).text, " cat");
    }

    #[test]
    fn alternatives_are_decoded_in_context() {
        let t = tokenizer();
        let prompt = [id(&t, "▁The"), id(&t, "▁cat")];
        let mut s = TextStream::new(vec![], &prompt, &t);
        let alternatives = [id(&t, "▁sat"), id(&t, "s"), id(&t, ".")];
        assert_eq!(s.next_texts(&alternatives, &t), [" sat", "s", "."]);
        s.push(id(&t, "▁sat"), &t);
        assert_eq!(
            s.next_texts(&[id(&t, "▁on"), id(&t, "▁mat")], &t),
            [" on", " mat"]
        );
    }

    #[test]
    fn a_stop_sequence_sees_the_space() {
        let t = tokenizer();
        let prompt = [id(&t, "▁The"), id(&t, "▁cat")];
        let mut s = TextStream::new(vec![" on".into()], &prompt, &t);
        assert_eq!(s.push(id(&t, "▁sat"), &t).text, " sat");
        let delta = s.push(id(&t, "▁on"), &t);
        assert_eq!(delta.stop.as_deref(), Some(" on"));
        assert_eq!(delta.text, "");
    }
}
