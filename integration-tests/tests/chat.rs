//! End-to-end tests of the Chat API: the real server with the bundled model
//! (whose tokenizer config carries a chat template), a copy of it without a
//! template, and that copy with a template configured for it.

use std::path::Path;

use futures::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use torchwire_integration_tests::{bundled_model, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{
    ChatMessage, ChatRequest, FinishReason, GenerateRequest, GenerateResponse, GenerationOptions,
    RenderChatRequest, TokenizeRequest,
};

type Client = InferenceClient<tonic::transport::Channel>;

/// The fallback template configured for the model without one.
const FALLBACK_TEMPLATE: &str =
    "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}[ASSISTANT]";

/// A server with three models: `tiny` (the bundled model and its
/// template), `plain` (the same files without a template) and `fallback`
/// (`plain` with FALLBACK_TEMPLATE configured).
async fn server(dir: &Path) -> Server {
    let model = bundled_model();
    let plain = dir.join("plain");
    std::fs::create_dir(&plain).unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::os::unix::fs::symlink(model.join(file), plain.join(file)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(
        plain.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let template = dir.join("fallback.jinja");
    std::fs::write(&template, FALLBACK_TEMPLATE).unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndefault_model = \"tiny\"\n\
         [models.tiny]\npath = {:?}\ndevice = \"cpu\"\n\
         [models.plain]\npath = {:?}\ndevice = \"cpu\"\n\
         [models.fallback]\npath = {:?}\ndevice = \"cpu\"\nchat_template = {:?}\n\
         [limits]\nmax_prompt_bytes = 3000\n",
        model.display().to_string(),
        plain.display().to_string(),
        plain.display().to_string(),
        template.display().to_string(),
    );
    let config_path = dir.join("torchwire.toml");
    std::fs::write(&config_path, toml).unwrap();
    Server::start_with_args(&[
        "--config".into(),
        config_path.display().to_string(),
        "--threads".into(),
        "1".into(),
    ])
    .await
    .unwrap()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

fn greedy(max_new_tokens: u32) -> Option<GenerationOptions> {
    Some(GenerationOptions {
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    })
}

fn chat_request(messages: Vec<ChatMessage>, max_new_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages,
        options: greedy(max_new_tokens),
        ..Default::default()
    }
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        message("system", "You answer with fortunes."),
        message("user", "What does my future hold?"),
        message("assistant", "Great things."),
        message("user", " Tell me more. "),
    ]
}

async fn stream(
    client: &mut Client,
    req: ChatRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut stream = client.chat(req).await?.into_inner();
    let mut out = vec![];
    while let Some(msg) = stream.next().await {
        out.push(msg?);
    }
    Ok(out)
}

#[tokio::test]
async fn chat_renders_the_template_streams_and_counts_like_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());

    // RenderChat: the documented format of the bundled template.
    let rendered = client
        .render_chat(RenderChatRequest {
            messages: conversation(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rendered.prompt,
        "<|bos|>system: You answer with fortunes.\nuser: What does my future hold?\n\
         assistant: Great things.<|eos|>\nuser: Tell me more.\nassistant:"
    );
    assert_eq!(rendered.model, "tiny");
    // Its count is Tokenize's for the rendered text (no special tokens
    // added: the template writes its own BOS).
    let tokenized = client
        .tokenize(TokenizeRequest {
            text: rendered.prompt.clone(),
            add_special_tokens: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rendered.count, tokenized.count);
    assert_eq!(rendered.token_ids, tokenized.token_ids);
    assert_eq!(rendered.token_ids[0], 0, "starts with <|bos|>");
    assert_eq!(
        rendered.token_ids.iter().filter(|&&t| t == 0).count(),
        1,
        "one BOS, not two"
    );

    // Chat streams several messages; the last one has the usage, whose
    // prompt is the rendered one.
    let mut req = chat_request(conversation(), 12);
    req.options.as_mut().unwrap().ignore_eos = true;
    let msgs = stream(&mut client, req.clone()).await.unwrap();
    assert!(msgs.len() > 1, "streamed: {msgs:?}");
    let last = msgs.last().unwrap();
    assert_eq!(last.finish_reason(), FinishReason::Length);
    let usage = last.usage.unwrap();
    assert_eq!(usage.prompt_tokens, rendered.count);
    assert_eq!(usage.completion_tokens, 12);
    let streamed: String = msgs.iter().map(|m| m.text.as_str()).collect();

    // ChatComplete gives the same greedy answer in one message.
    let whole = client.chat_complete(req).await.unwrap().into_inner();
    assert_eq!(whole.text, streamed);
    assert_eq!(whole.token_ids.len(), 12);

    // Generate on the same token ids (its prompt gets a BOS added, so the
    // rendered text goes without its own) gives the same greedy tokens.
    let generate = client
        .complete(GenerateRequest {
            prompt: rendered.prompt.trim_start_matches("<|bos|>").to_string(),
            options: Some(GenerationOptions {
                max_new_tokens: Some(12),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generate.usage.unwrap().prompt_tokens, rendered.count);
    assert_eq!(generate.token_ids, whole.token_ids);

    // Without ignore_eos, the model's end-of-sequence token ends the turn
    // (or the length limit does, for a model never trained to chat).
    let answer = client
        .chat_complete(chat_request(conversation(), 64))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        answer.finish_reason(),
        FinishReason::EndOfSequence | FinishReason::Length
    ));
    // An end-of-sequence token is reported as the last token id, never in
    // the text (the template writes its own `<|eos|>` after an answer).
    let eos = answer.token_ids.iter().position(|&t| t == 1);
    if answer.finish_reason() == FinishReason::EndOfSequence {
        assert_eq!(eos, Some(answer.token_ids.len() - 1), "{answer:?}");
    } else {
        assert_eq!(eos, None, "{answer:?}");
    }
    assert!(!answer.text.contains("<|eos|>"), "{answer:?}");
}

#[tokio::test]
async fn bad_chats_get_clear_statuses_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());

    let refused = |status: tonic::Status, code: Code, start: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().starts_with(start),
            "{:?} should start with {start:?}",
            status.message()
        );
        status.message().to_string()
    };

    let err = client.chat(chat_request(vec![], 4)).await.unwrap_err();
    refused(err, Code::InvalidArgument, "messages: must not be empty");

    let bad_role = vec![message("user", "hi"), message("wizard", "abracadabra")];
    let err = client
        .chat_complete(chat_request(bad_role.clone(), 4))
        .await
        .unwrap_err();
    let msg = refused(err, Code::InvalidArgument, "messages[1].role: ");
    assert!(msg.contains("wizard"), "{msg}");
    let err = client
        .render_chat(RenderChatRequest {
            messages: bad_role,
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(err, Code::InvalidArgument, "messages[1].role: ");

    // The bundled template raises for a system message that is not first.
    let late_system = vec![message("user", "hi"), message("system", "be brief")];
    let err = client.chat(chat_request(late_system, 4)).await.unwrap_err();
    let msg = refused(err, Code::InvalidArgument, "messages: ");
    assert!(
        msg.contains("a system message may only come first"),
        "{msg}"
    );

    let mut bad_options = chat_request(vec![message("user", "hi")], 4);
    bad_options.options.as_mut().unwrap().temperature = -1.0;
    let err = client.chat(bad_options).await.unwrap_err();
    refused(err, Code::InvalidArgument, "options.temperature: ");

    let err = client
        .chat(chat_request(vec![message("user", "hi")], 100_000))
        .await
        .unwrap_err();
    refused(err, Code::InvalidArgument, "options.max_new_tokens: ");

    // Every bad field at once, one google.rpc.BadRequest violation each;
    // messages over limits.max_prompt_bytes are refused before rendering.
    let mut bad = chat_request(vec![message("user", &"a".repeat(3001))], 4);
    bad.options.as_mut().unwrap().top_p = 2.0;
    let err = client.chat(bad).await.unwrap_err();
    let msg = refused(err.clone(), Code::InvalidArgument, "messages: ");
    assert!(msg.contains("max_prompt_bytes"), "{msg}");
    let details = err.get_details_bad_request().expect("BadRequest details");
    let fields: Vec<_> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["messages", "options.top_p"], "{details:?}");
    let err = client
        .render_chat(RenderChatRequest {
            messages: vec![message("user", &"a".repeat(3001))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(err, Code::InvalidArgument, "messages: ");

    // A model without a template: FAILED_PRECONDITION, never a made-up format.
    let mut plain = chat_request(vec![message("user", "hi")], 4);
    plain.model = "plain".into();
    let err = client.chat(plain.clone()).await.unwrap_err();
    let msg = refused(
        err,
        Code::FailedPrecondition,
        "model \"plain\" has no chat template",
    );
    assert!(msg.contains("models.plain.chat_template"), "{msg}");
    // ... which still serves Generate.
    let generated = client
        .complete(GenerateRequest {
            model: "plain".into(),
            prompt: "Hello".into(),
            max_new_tokens: Some(2),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.token_ids.len(), 2);

    // The same files with a configured template.
    let rendered = client
        .render_chat(RenderChatRequest {
            model: "fallback".into(),
            messages: vec![message("system", "s"), message("user", "hi")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rendered.prompt, "[SYSTEM] s\n[USER] hi\n[ASSISTANT]");
    plain.model = "fallback".into();
    let answer = client.chat_complete(plain).await.unwrap().into_inner();
    assert_eq!(answer.model, "fallback");
    assert!(!answer.token_ids.is_empty());

    // GenerateRequest: nested options or the flat fields, not both.
    let err = client
        .complete(GenerateRequest {
            prompt: "Hello".into(),
            temperature: 0.5,
            options: greedy(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(err, Code::InvalidArgument, "options: ");

    // Still serving after all that.
    let ok = client
        .chat_complete(chat_request(vec![message("user", "hi")], 2))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.token_ids.is_empty());
}

/// Runs `torchwire --addr <addr> args...` with `input` on stdin; it must succeed.
async fn torchwire_cli(addr: &str, args: &[&str], input: &str) -> std::process::Output {
    let out = torchwire_integration_tests::torchwire(addr, args, Some(input)).await;
    assert!(
        out.status.success(),
        "torchwire {args:?}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn the_cli_chats_interactively_and_from_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let addr = server.url();
    let answer = |messages: Vec<ChatMessage>| {
        let mut client = client.clone();
        async move {
            client
                .chat_complete(chat_request(messages, 6))
                .await
                .unwrap()
                .into_inner()
                .text
        }
    };

    // Two turns typed on stdin: the second is sent with the whole history.
    let out = torchwire_cli(
        &addr,
        &[
            "chat",
            "--system",
            "Be wise.",
            "--max-new-tokens",
            "6",
            "-q",
        ],
        "Hello\nWhat next?\n/quit\nnot sent\n",
    )
    .await;
    let first = answer(vec![
        message("system", "Be wise."),
        message("user", "Hello"),
    ])
    .await;
    let second = answer(vec![
        message("system", "Be wise."),
        message("user", "Hello"),
        message("assistant", &first),
        message("user", "What next?"),
    ])
    .await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{first}\n{second}\n")
    );

    // /new forgets the conversation: the turn after it is answered alone.
    let out = torchwire_cli(
        &addr,
        &["chat", "--max-new-tokens", "6", "-q"],
        "Hello\n/new\nWhat next?\n",
    )
    .await;
    let alone = answer(vec![message("user", "What next?")]).await;
    let hello = answer(vec![message("user", "Hello")]).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{hello}\n{alone}\n")
    );

    // One scripted turn from JSON on stdin.
    let json = r#"[{"role": "user", "content": "Hello"}]"#;
    let out = torchwire_cli(
        &addr,
        &["chat", "--messages", "-", "--max-new-tokens", "6"],
        json,
    )
    .await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{hello}\n"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("completion tokens:"),
        "summary on stderr"
    );

    // --render prints what the model sees.
    let out = torchwire_cli(&addr, &["chat", "--messages", "-", "--render"], json).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|bos|>user: Hello\nassistant:"
    );
    let rendered = client
        .render_chat(RenderChatRequest {
            messages: vec![message("user", "Hello")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("prompt tokens: {}", rendered.count)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
