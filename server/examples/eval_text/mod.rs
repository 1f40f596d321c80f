//! The text the quality examples (`quant_eval`, `kv_eval`) score a model
//! on: a file named on the command line, or a built-in English paragraph.

use std::path::Path;

const TEXT: &str = "The old lighthouse keeper climbed the winding stairs every evening to light \
the lamp. Ships passing in the night relied on its steady beam to find their way around the \
rocky coast. You will meet a stranger who changes your life. A journey of a thousand miles \
begins with a single step. Fortune favors the bold, but patience is a virtue too. Never put \
off until tomorrow what you can do today. The best way to predict the future is to invent it. \
He who laughs last laughs best, and she who reads the fine print laughs longest. Your hard \
work will soon pay off, so keep going even when the road is long and the night is dark.";

/// The token ids of `file` (the paragraph above where it is `None` or
/// empty) under the tokenizer of the checkpoint in `dir`.
pub fn token_ids(dir: &Path, file: Option<&String>) -> Vec<u32> {
    let text = file
        .filter(|f| !f.is_empty())
        .map(|f| std::fs::read_to_string(f).expect("read the text file"))
        .unwrap_or_else(|| TEXT.to_string());
    let tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    tokenizer
        .encode(text.as_str(), true)
        .expect("encode")
        .get_ids()
        .to_vec()
}
