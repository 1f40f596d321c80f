//! Chat-template parity with Hugging Face transformers: real templates of
//! popular models (llama.cpp's `models/templates`, fetched from the
//! llama-cpp-python sdist on PyPI by `scripts/fetch_chat_templates.sh`) are
//! rendered by the server's renderer and by transformers'
//! `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
//! (`scripts/chat_template_reference.py`), for several conversations: the
//! prompts must be identical, and a template that refuses a conversation
//! (`raise_exception`) must refuse it on both sides with the same message.
//!
//! `TORCHWIRE_TEMPLATE_PARITY_ALL=1` compares every fetched template instead
//! of the list below. Known differences there: the tool-calling-only
//! templates of Hermes 2 Pro / Hermes 3 (`*-tool_use`) and Command R+
//! (`*-tool_use`) fail in transformers when no tools are given (they iterate
//! `tools`, which is None), whereas minijinja iterates None as empty.
//!
//! Needs the `python` of scripts/env.sh on PATH and PyPI reachable on the
//! first run (the templates are cached under $TORCHWIRE_CACHE).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use torchwire_proto::v1::ChatMessage;
use torchwire_server::chat::{self, ChatTemplate, RenderError, SpecialTokens, TemplateOrigin};

/// Template file (without `.jinja`), BOS and EOS strings of its model.
const TEMPLATES: &[(&str, &str, &str)] = &[
    (
        "meta-llama-Llama-3.1-8B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    (
        "meta-llama-Llama-3.2-3B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    (
        "meta-llama-Llama-3.3-70B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    ("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B", "", "<|im_end|>"),
    ("Qwen-QwQ-32B", "", "<|im_end|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>"),
    ("HuggingFaceTB-SmolLM3-3B", "", "<|im_end|>"),
    ("google-gemma-2-2b-it", "<bos>", "<eos>"),
    (
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "ibm-granite-granite-3.3-2B-Instruct",
        "<|end_of_text|>",
        "<|end_of_text|>",
    ),
    ("microsoft-Phi-3.5-mini-instruct", "<s>", "<|endoftext|>"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "<s>", "</s>"),
    ("unsloth-mistral-Devstral-Small-2507", "<s>", "</s>"),
    ("ibm-granite-granite-4.0", "", "<|end_of_text|>"),
    ("Qwen3.5-4B", "", "<|im_end|>"),
    ("LFM2.5-Instruct", "<|startoftext|>", "<|im_end|>"),
    ("google-gemma-4-31B-it", "<bos>", "<turn|>"),
    ("openai-gpt-oss-120b", "", "<|return|>"),
];

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// The conversations every template renders (or refuses on both sides).
fn conversations() -> Vec<(&'static str, Vec<ChatMessage>)> {
    let system = message("system", "You are a terse assistant.");
    let mut tool = message("tool", "{\"temperature_c\": 21, \"sky\": \"clear\"}");
    tool.tool_call_id = Some("call_0001".into());
    let mut named = message("user", "Who am I?");
    named.name = Some("ann".into());
    vec![
        (
            "one user turn",
            vec![message("user", "Hello! What is 2+2?")],
        ),
        (
            "system and user",
            vec![system.clone(), message("user", "  Name a colour.  ")],
        ),
        (
            "multi-turn with system",
            vec![
                system.clone(),
                message("user", "Hi"),
                message("assistant", "Hello! How can I help?"),
                message("user", "Tell me a joke about \"quotes\" & <tags>."),
            ],
        ),
        (
            "multi-turn without system",
            vec![
                message("user", "Ünïcödé: 日本語 ✓\nsecond line"),
                message("assistant", " Noted.\n\n"),
                message("user", "Thanks\t!"),
            ],
        ),
        (
            "tool result",
            vec![
                system,
                message("user", "What is the weather in Paris?"),
                message("assistant", "Let me check."),
                tool,
            ],
        ),
        ("named user", vec![named]),
    ]
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn template_dir() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch_chat_templates.sh"))
        .env("PYTHON", "python")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/fetch_chat_templates.sh (source scripts/env.sh first)");
    assert!(out.status.success(), "fetch_chat_templates.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[derive(Serialize)]
struct Case<'a> {
    template: &'a Path,
    special_tokens: serde_json::Map<String, serde_json::Value>,
    messages: Vec<chat::TemplateMessage<'a>>,
}

#[derive(Deserialize)]
struct Results {
    results: Vec<Reference>,
}

#[derive(Deserialize, Debug)]
struct Reference {
    rendered: Option<String>,
    error: Option<String>,
}

fn special_tokens(bos: &str, eos: &str) -> SpecialTokens {
    let mut tokens = vec![];
    if !bos.is_empty() {
        tokens.push(("bos_token", bos.to_string()));
    }
    tokens.push(("eos_token", eos.to_string()));
    SpecialTokens { tokens }
}

fn reference(input: &str) -> Vec<Reference> {
    let mut child = Command::new("python")
        .arg(repo_root().join("scripts/chat_template_reference.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python (source scripts/env.sh first)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chat_template_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Results>(&out.stdout)
        .expect("reference JSON")
        .results
}

/// The templates to compare: [`TEMPLATES`], or with
/// `TORCHWIRE_TEMPLATE_PARITY_ALL=1` every fetched template (with `<s>` and
/// `</s>` as BOS and EOS), to survey templates beyond the list.
fn templates(dir: &Path) -> Vec<(String, String, String)> {
    if std::env::var_os("TORCHWIRE_TEMPLATE_PARITY_ALL").is_some() {
        let mut all: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let name = name.strip_suffix(".jinja")?.to_string();
                Some((name, "<s>".to_string(), "</s>".to_string()))
            })
            .collect();
        all.sort();
        return all;
    }
    TEMPLATES
        .iter()
        .map(|(n, b, e)| (n.to_string(), b.to_string(), e.to_string()))
        .collect()
}

#[test]
fn rendered_prompts_match_transformers() {
    let dir = template_dir();
    let templates = templates(&dir);
    let conversations = conversations();
    let mut cases = vec![];
    let mut paths = vec![];
    for (name, _, _) in &templates {
        paths.push(dir.join(format!("{name}.jinja")));
    }
    for (i, (_, bos, eos)) in templates.iter().enumerate() {
        let mut special = serde_json::Map::new();
        for (k, v) in special_tokens(bos, eos).tokens {
            special.insert(k.to_string(), v.into());
        }
        for (_, messages) in &conversations {
            cases.push(Case {
                template: &paths[i],
                special_tokens: special.clone(),
                messages: chat::template_messages(messages),
            });
        }
    }
    let input = serde_json::to_string(&serde_json::json!({ "cases": cases })).unwrap();
    let references = reference(&input);
    assert_eq!(references.len(), cases.len());

    let mut failures = vec![];
    let mut rendered = 0;
    let mut refused = 0;
    let mut references = references.into_iter();
    for ((name, bos, eos), path) in templates.iter().zip(&paths) {
        let source = std::fs::read_to_string(path).unwrap();
        let template =
            match ChatTemplate::new(&source, special_tokens(bos, eos), TemplateOrigin::Inline) {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    for _ in &conversations {
                        references.next();
                    }
                    continue;
                }
            };
        let mut template_rendered = 0;
        for (conversation, messages) in &conversations {
            let want = references.next().unwrap();
            let got = template.render(&chat::template_messages(messages), true);
            match (&want.rendered, &want.error, got) {
                (Some(want), _, Ok(got)) if *want == got => {
                    rendered += 1;
                    template_rendered += 1;
                }
                (None, Some(error), Err(RenderError::Raised(message)))
                    if error.ends_with(&message) =>
                {
                    refused += 1
                }
                // Neither can render it (e.g. a tool-calling template given no tools).
                (None, Some(error), Err(RenderError::Failed(_)))
                    if !error.starts_with("TemplateError") =>
                {
                    refused += 1
                }
                (_, _, got) => failures.push(format!(
                    "{name} / {conversation}:\n  transformers: {}\n  torchwire:    {}",
                    short(&format!("{want:?}")),
                    short(&format!("{got:?}"))
                )),
            }
        }
        // A template that refused every conversation would prove nothing.
        if template_rendered < 2 {
            failures.push(format!(
                "{name}: only {template_rendered} conversations rendered"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{} templates: {rendered} prompts identical to transformers, {refused} refusals identical",
        templates.len()
    );
}

/// The first 600 characters of a long rendering, for failure messages.
fn short(s: &str) -> String {
    match s.char_indices().nth(600) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
