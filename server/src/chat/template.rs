//! A Hugging Face chat template compiled with minijinja, set up the way
//! transformers renders it (`apply_chat_template`): trim_blocks and
//! lstrip_blocks, Python's string and dict methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps` does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

const NAME: &str = "chat";

/// Why a render failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template called `raise_exception(message)`: it refuses the input.
    #[error("{0}")]
    Raised(String),
    /// The template could not be rendered (a construct or method minijinja
    /// does not support, a type error in the template...).
    #[error("{0}")]
    Failed(String),
}

/// Marks the error `raise_exception` returns, so a render can tell it apart.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

/// The special-token strings a template may refer to (`bos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub tokens: Vec<(&'static str, String)>,
}

impl SpecialTokens {
    /// The names transformers passes to a template (its special_tokens_map).
    pub const NAMES: [&'static str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];

    /// Reads the special tokens of a `tokenizer_config.json`: each is a
    /// string or an `AddedToken` object (`{"content": ...}`), or absent.
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Self {
        let tokens = Self::NAMES
            .iter()
            .filter_map(|&name| {
                let v = config.get(name)?;
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                    _ => return None,
                };
                Some((name, s))
            })
            .collect();
        Self { tokens }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.as_str())
    }
}

/// Where a model's template came from, for logs and errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// A template file (`chat_template.jinja`, or one configured).
    File(PathBuf),
    /// `chat_template` in `tokenizer_config.json` (the named one, if a list).
    TokenizerConfig { path: PathBuf, name: Option<String> },
    /// Given as a string (tests).
    Inline,
}

impl std::fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::TokenizerConfig { path, name: None } => {
                write!(f, "{} (chat_template)", path.display())
            }
            Self::TokenizerConfig {
                path,
                name: Some(n),
            } => write!(f, "{} (chat_template {n:?})", path.display()),
            Self::Inline => f.write_str("inline template"),
        }
    }
}

/// A compiled chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
    origin: TemplateOrigin,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(
        source: &str,
        special: SpecialTokens,
        origin: TemplateOrigin,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("length", length);
        env.add_filter("count", length);
        env.add_test("iterable", is_iterable);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| format!("{origin}: the chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            special,
            origin,
        })
    }

    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages` (a sequence of message maps) as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`
    /// does, with no tools and no documents.
    pub fn render<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String, RenderError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| RenderError::Failed(e.to_string()))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (name, token) in &self.special.tokens {
            ctx.push((name, Value::from(token.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect();
        tmpl.render(ctx).map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(Raised(message)) = err.downcast_ref::<Raised>() {
                    return RenderError::Raised(message.clone());
                }
                source = err.source();
            }
            RenderError::Failed(format!("{e:#}"))
        })
    }
}

/// Reads a model's chat template: `override_path` when given, else
/// `chat_template.jinja` in `dir`, else `chat_template` in
/// `dir/tokenizer_config.json` (a string, or a list of `{name, template}` of
/// which `default` is used). `Ok(None)`: the model has none.
pub fn load(dir: &Path, override_path: Option<&Path>) -> Result<Option<ChatTemplate>, String> {
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| format!("{}: not valid JSON: {e}", config_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
        Err(e) => return Err(format!("{}: {e}", config_path.display())),
    };
    let special = SpecialTokens::from_tokenizer_config(&config);
    let read_file = |path: PathBuf| -> Result<(String, TemplateOrigin), String> {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((text, TemplateOrigin::File(path)))
    };
    let jinja = dir.join("chat_template.jinja");
    let (source, origin) = if let Some(p) = override_path {
        read_file(dir.join(p))?
    } else if jinja.is_file() {
        read_file(jinja)?
    } else {
        match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => (
                s.clone(),
                TemplateOrigin::TokenizerConfig {
                    path: config_path,
                    name: None,
                },
            ),
            Some(serde_json::Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                let Some(source) = default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                else {
                    return Err(format!(
                        "{}: chat_template is a list of named templates without one named \"default\"",
                        config_path.display()
                    ));
                };
                (
                    source.to_string(),
                    TemplateOrigin::TokenizerConfig {
                        path: config_path,
                        name: Some("default".into()),
                    },
                )
            }
            Some(_) => {
                return Err(format!(
                    "{}: chat_template must be a string or a list of {{name, template}}",
                    config_path.display()
                ))
            }
        }
    };
    ChatTemplate::new(&source, special, origin).map(Some)
}

/// `{% generation %}...{% endgeneration %}` marks the assistant's tokens for
/// transformers' training masks and renders its body unchanged; minijinja
/// has no such tag, so the markers are dropped (whitespace control included).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if word == "generation" || word == "endgeneration" {
            out.push_str(&rest[..start]);
            rest = &rest[start + len + 2..];
        } else {
            out.push_str(&rest[..start + len + 2]);
            rest = &rest[start + len + 2..];
        }
    }
    out.push_str(rest);
    out
}

/// Jinja2's `length`: an undefined value (a missing key) has length 0.
fn length(v: &Value) -> Result<usize, Error> {
    if v.is_undefined() {
        return Ok(0);
    }
    minijinja::filters::length(v)
}

/// Jinja2's `iterable` test: None is not iterable (minijinja iterates it as
/// empty), an undefined value is.
fn is_iterable(v: &Value) -> bool {
    match v.kind() {
        ValueKind::None => false,
        ValueKind::Undefined => true,
        _ => v.try_iter().is_ok(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `strftime_now(format)`: the local time now, like Python's
/// `datetime.now().strftime(format)`.
fn strftime_now(format: String) -> Result<String, Error> {
    let items: Vec<_> = chrono::format::StrftimeItems::new(&format).collect();
    if items.contains(&chrono::format::Item::Error) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        ));
    }
    Ok(chrono::Local::now()
        .format_with_items(items.into_iter())
        .to_string())
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, the filter transformers installs as `tojson`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
        Some(v) => Some(" ".repeat(v.as_i64().map_or(0, |n| n.max(0) as usize))),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let dumper = Dumper {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    // A string, not marked safe: transformers' environment does not autoescape.
    Ok(Value::from(out))
}

struct Dumper {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl Dumper {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn dump(&self, v: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or(""), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), level, out, |i, out| {
                    self.dump(&items[i], level + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container('{', '}', keys.len(), level, out, |i, out| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.dump(&v.get_item(key)?, level + 1, out)
                })?;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a {} value", v.kind()),
                ))
            }
        }
        Ok(())
    }

    fn container(
        &self,
        open: char,
        close: char,
        len: usize,
        level: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(level + 1, out);
            item(i, out)?;
        }
        self.newline(level, out);
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.5`, `1e+16`, `NaN`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: shortest digits in exponent form, exponent with a sign and
        // at least two digits.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let special = SpecialTokens {
            tokens: vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())],
        };
        ChatTemplate::new(source, special, TemplateOrigin::Inline).unwrap()
    }

    fn messages(v: serde_json::Value) -> serde_json::Value {
        v
    }

    #[test]
    fn renders_with_special_tokens_and_trimmed_blocks() {
        let t = template(
            "{{ bos_token }}\n{% for m in messages %}\n  {{ m.role }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}",
        );
        let out = t
            .render(
                &messages(serde_json::json!([{"role": "user", "content": " hi "}])),
                true,
            )
            .unwrap();
        assert_eq!(out, "<s>\n  user: hi\nassistant:");
    }

    #[test]
    fn raise_exception_is_reported_with_its_message() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        match t.render(&serde_json::json!([]), true) {
            Err(RenderError::Raised(m)) => assert_eq!(m, "roles must alternate"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = template("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é<' | tojson }}");
        let ctx = serde_json::json!({"a": [1, 2.5, 1.0], "b": null, "c": "q\"\n"});
        let out = t.env.render_str(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é<' | tojson }}",
            minijinja::context! { x => Value::from_serialize(&ctx) },
        );
        drop(t);
        assert_eq!(
            out.unwrap(),
            "{\"a\": [1, 2.5, 1.0], \"b\": null, \"c\": \"q\\\"\\n\"}|{\n  \"a\": [\n    1,\n    2.5,\n    1.0\n  ],\n  \"b\": null,\n  \"c\": \"q\\\"\\n\"\n}|\"é<\""
        );
    }

    #[test]
    fn none_and_undefined_behave_as_in_jinja2() {
        let t = template("");
        let out = t.env.render_str(
            "{{ tools is iterable }} {{ m.x | length }} {{ m is iterable }} {{ [1, 2] | length }}",
            minijinja::context! { tools => (), m => Value::from_serialize(serde_json::json!({})) },
        );
        drop(t);
        assert_eq!(out.unwrap(), "False 0 True 2");
    }

    #[test]
    fn generation_tags_are_dropped() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}"),
            "abc{% if x %}"
        );
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
    }

    #[test]
    fn special_tokens_may_be_added_token_objects() {
        let config = serde_json::json!({
            "bos_token": {"content": "<|begin|>", "lstrip": false},
            "eos_token": "<|end|>",
            "pad_token": null,
        });
        let s = SpecialTokens::from_tokenizer_config(&config);
        assert_eq!(s.get("bos_token"), Some("<|begin|>"));
        assert_eq!(s.get("eos_token"), Some("<|end|>"));
        assert_eq!(s.get("pad_token"), None);
    }
}
