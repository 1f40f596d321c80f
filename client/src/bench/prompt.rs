//! Prompts of an exact token length, measured with the server's own
//! tokenizer (the Tokenize RPC, with special tokens as Generate adds them),
//! so that a benchmark's prompt length means the same on every model.

use crate::{Client, Error};

/// Plain prose the prompt is cut from; repeated as often as needed.
const TEXT: &str =
    "The old lighthouse keeper climbed the winding stairs every evening to light the lamp. \
Ships passing in the night relied on its steady beam to find their way around the rocky coast. \
One winter a storm knocked out the power, and he kept the flame burning by hand until morning. \
The fishermen of the village never forgot it, and they told the story to their children for years.";

/// Words appended one at a time to reach the exact count; short common
/// words are a single token in nearly every vocabulary.
const FILLERS: [&str; 4] = [" the", " a", " and", " of"];

/// A prompt of exactly `tokens` tokens for `model`, or the closest one below
/// it if the tokenizer allows no exact fit (the count is returned; it is
/// above `tokens` only when a single word is already longer).
pub async fn build(client: &Client, model: &str, tokens: u32) -> Result<(String, u32), Error> {
    let count = |text: String| async move {
        let n = client.tokenize(model, &text, true).await?.count;
        Ok::<_, Error>((text, n))
    };
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    let prefix = |n: usize| -> String {
        (0..n)
            .map(|i| words[i % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };

    // Grow an upper bound on the word count, then binary-search for the
    // longest prefix that does not exceed the target.
    let (mut lo, mut lo_text, mut lo_count) = (0usize, String::new(), 0u32);
    let mut hi = (tokens as usize).max(1);
    loop {
        let (text, n) = count(prefix(hi)).await?;
        if n > tokens {
            break;
        }
        (lo, lo_text, lo_count) = (hi, text, n);
        if n == tokens {
            return Ok((lo_text, lo_count));
        }
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let (text, n) = count(prefix(mid)).await?;
        if n <= tokens {
            (lo, lo_text, lo_count) = (mid, text, n);
            if n == tokens {
                return Ok((lo_text, lo_count));
            }
        } else {
            hi = mid;
        }
    }

    if lo_text.is_empty() {
        // Even one word is longer than asked for: the shortest prompt there is.
        return count(prefix(1)).await;
    }

    // Top up with one-token words.
    let (mut text, mut n) = (lo_text, lo_count);
    'grow: while n < tokens {
        for filler in FILLERS {
            let (candidate, m) = count(format!("{text}{filler}")).await?;
            if m > n && m <= tokens {
                (text, n) = (candidate, m);
                continue 'grow;
            }
        }
        break;
    }
    Ok((text, n))
}
