//! End-to-end tests of chat sessions: conversations kept in a real
//! nats-server's key-value bucket, continued by another server process,
//! raced by two servers, expired by the bucket's TTL, continued over the
//! NATS work queue, and refused with clear statuses when they cannot be served.

use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use torchwire_integration_tests::{model_stats, until, NatsServer, Server};
use torchwire_nats::{codec, headers, Encoding};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{
    ChatMessage, ChatRequest, DeleteSessionRequest, FinishReason, GenerateResponse,
    GenerationOptions, GetSessionRequest, RenderChatRequest, Session, SessionMode,
};

type Client = InferenceClient<tonic::transport::Channel>;

/// Long enough for the slowest CI machine; conditions are polled, not slept on.
const WAIT: Duration = Duration::from_secs(120);

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// A turn of `session` adding one user message, answered with `tokens` tokens.
fn turn(session: &str, mode: SessionMode, text: &str, tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: vec![message("user", text)],
        options: Some(GenerationOptions {
            max_new_tokens: Some(tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        session_id: session.into(),
        session_mode: mode as i32,
        ..Default::default()
    }
}

async fn server(nats: &NatsServer, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let url = nats.url();
    let mut flags = vec!["--nats-url", url.as_str()];
    flags.extend_from_slice(extra);
    Server::start_with_env(&Server::default_args(&flags), env)
        .await
        .unwrap()
}

async fn client(server: &Server) -> Client {
    InferenceClient::new(server.channel().await.unwrap())
}

async fn get(client: &mut Client, id: &str) -> Result<Session, tonic::Status> {
    let found = client
        .get_session(GetSessionRequest {
            session_id: id.into(),
        })
        .await?
        .into_inner();
    Ok(found.session.expect("a found session has a body"))
}

/// Streams a turn; returns the answer's text and its final message.
async fn chat(
    client: &mut Client,
    req: ChatRequest,
) -> Result<(String, GenerateResponse), tonic::Status> {
    let mut stream = client.chat(req).await?.into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        text.push_str(&msg.text);
        last = Some(msg);
    }
    Ok((text, last.expect("a stream ends with a final message")))
}

fn roles(session: &Session) -> Vec<&str> {
    session.messages.iter().map(|m| m.role.as_str()).collect()
}

fn expect_status(status: tonic::Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn a_conversation_outlives_the_server_that_held_it() {
    let nats = NatsServer::start().unwrap();
    let mut first = server(&nats, &[], &[]).await;
    let mut c = client(&first).await;
    let (answer1, last) = chat(
        &mut c,
        turn("trip-42", SessionMode::Auto, "Plan a trip.", 6),
    )
    .await
    .unwrap();
    assert_eq!(last.finish_reason(), FinishReason::Length);
    assert!(!answer1.is_empty());
    let stored = get(&mut c, "trip-42").await.unwrap();
    assert_eq!(roles(&stored), ["user", "assistant"]);
    assert_eq!(stored.messages[1].content, answer1);
    assert_eq!(stored.model, "torchwire-tiny");
    assert!(stored.revision > 0 && stored.updated_unix_ms > 0);

    // The replica is killed outright; another one continues.
    first.signal(libc::SIGKILL);
    first.wait_exit(WAIT).unwrap();
    let second = server(&nats, &[], &[]).await;
    let mut c = client(&second).await;

    // RenderChat with the session shows the stored turns before the new one.
    let rendered = c
        .render_chat(RenderChatRequest {
            messages: vec![message("user", "By train.")],
            session_id: "trip-42".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        rendered.prompt.contains("user: Plan a trip.\nassistant: ")
            && rendered.prompt.ends_with("user: By train.\nassistant:"),
        "{:?}",
        rendered.prompt
    );

    let whole = c
        .chat_complete(turn("trip-42", SessionMode::Continue, "By train.", 5))
        .await
        .unwrap()
        .into_inner();
    // The model read the whole conversation: the prompt RenderChat showed.
    assert_eq!(whole.usage.unwrap().prompt_tokens, rendered.count);
    let stored = get(&mut c, "trip-42").await.unwrap();
    assert_eq!(roles(&stored), ["user", "assistant", "user", "assistant"]);
    assert_eq!(stored.messages[1].content, answer1);
    assert_eq!(stored.messages[2].content, "By train.");
    assert_eq!(stored.messages[3].content, whole.text);

    // DeleteSession forgets it; continuing it is then NOT_FOUND.
    let deleted = |id: &str| DeleteSessionRequest {
        session_id: id.into(),
    };
    assert!(
        c.delete_session(deleted("trip-42"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !c.delete_session(deleted("trip-42"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    expect_status(
        get(&mut c, "trip-42").await.unwrap_err(),
        Code::NotFound,
        "trip-42",
    );
    let err = c
        .chat_complete(turn("trip-42", SessionMode::Continue, "Hello?", 2))
        .await
        .unwrap_err();
    expect_status(err, Code::NotFound, "trip-42");
    // AUTO starts it afresh.
    c.chat_complete(turn("trip-42", SessionMode::Auto, "Hello?", 2))
        .await
        .unwrap();
    assert_eq!(
        roles(&get(&mut c, "trip-42").await.unwrap()),
        ["user", "assistant"]
    );
}

#[tokio::test]
async fn racing_turns_of_one_session_store_exactly_one() {
    let nats = NatsServer::start().unwrap();
    let a = server(&nats, &[], &[]).await;
    let b = server(&nats, &[], &[]).await;
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);
    ca.chat_complete(turn("race", SessionMode::Auto, "Start.", 3))
        .await
        .unwrap();
    let before = get(&mut ca, "race").await.unwrap();

    // Both read the same revision and generate long enough to overlap.
    let (ra, rb) = tokio::join!(
        ca.chat_complete(turn("race", SessionMode::Continue, "From A.", 200)),
        cb.chat_complete(turn("race", SessionMode::Continue, "From B.", 200)),
    );
    let (winner, loser, said) = match (ra, rb) {
        (Ok(w), Err(l)) => (w.into_inner(), l, "From A."),
        (Err(l), Ok(w)) => (w.into_inner(), l, "From B."),
        other => panic!("exactly one turn must win: {other:?}"),
    };
    assert_eq!(loser.code(), Code::Aborted, "{loser:?}");
    assert!(loser.message().contains("retry"), "{loser:?}");

    let after = get(&mut cb, "race").await.unwrap();
    assert_eq!(roles(&after), ["user", "assistant", "user", "assistant"]);
    assert_eq!(after.messages[..2], before.messages[..]);
    assert_eq!(after.messages[2].content, said);
    assert_eq!(after.messages[3].content, winner.text);
    assert!(after.revision > before.revision);

    // The loser retries and is stored after the winner.
    let loser_text = if said == "From A." {
        "From B."
    } else {
        "From A."
    };
    ca.chat_complete(turn("race", SessionMode::Continue, loser_text, 2))
        .await
        .unwrap();
    let last = get(&mut ca, "race").await.unwrap();
    assert_eq!(last.messages.len(), 6);
    assert_eq!(last.messages[4].content, loser_text);

    // A turn its client cancels stores nothing.
    let mut stream = ca
        .chat(turn("race", SessionMode::Continue, "Never mind.", 200))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    until("the cancelled turn to leave the batch", WAIT, async || {
        (model_stats(&mut ca).await.running == 0).then_some(())
    })
    .await;
    assert_eq!(get(&mut ca, "race").await.unwrap(), last);
}

#[tokio::test]
async fn an_expired_session_is_not_found_when_continued() {
    let nats = NatsServer::start().unwrap();
    let s = server(
        &nats,
        &[],
        &[
            ("TORCHWIRE_SESSIONS_TTL_SECS", "1"),
            ("TORCHWIRE_SESSIONS_BUCKET", "short_lived"),
        ],
    )
    .await;
    let mut c = client(&s).await;
    c.chat_complete(turn("brief", SessionMode::Auto, "Hi.", 2))
        .await
        .unwrap();
    get(&mut c, "brief").await.unwrap();
    // The bucket drops it a second after its last write.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match get(&mut c, "brief").await {
            Ok(_) => assert!(tokio::time::Instant::now() < deadline, "never expired"),
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = c
        .chat_complete(turn("brief", SessionMode::Continue, "Still there?", 2))
        .await
        .unwrap_err();
    expect_status(err, Code::NotFound, "expired");

    // The bucket was created with the configured TTL.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("short_lived").await.unwrap();
    let status = kv.status().await.unwrap();
    assert_eq!(status.max_age(), Duration::from_secs(1));
}

#[tokio::test]
async fn a_chat_over_the_work_queue_continues_a_session() {
    let nats = NatsServer::start().unwrap();
    let s = server(&nats, &[], &[]).await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc.clone());

    // Publishes a request with `method` and returns its responses up to the final one.
    let request = |reply: &'static str, method: &'static str, body: bytes::Bytes| {
        let (nc, js) = (nc.clone(), js.clone());
        async move {
            let mut sub = nc.subscribe(reply).await.unwrap();
            nc.flush().await.unwrap();
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::REPLY_TO, reply);
            h.insert(headers::CONTENT_TYPE, headers::JSON);
            h.insert(headers::METHOD, method);
            js.publish_with_headers("torchwire.generate", h, body)
                .await
                .unwrap()
                .await
                .unwrap();
            let mut out = vec![];
            loop {
                let msg = tokio::time::timeout(WAIT, sub.next())
                    .await
                    .expect("a response in time")
                    .unwrap();
                let last = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::FINAL))
                    .is_some();
                out.push(codec::decode_response(&msg.payload, Encoding::Json).unwrap());
                if last {
                    return out;
                }
            }
        }
    };

    let body = codec::encode_chat_request(
        &turn("queued-1", SessionMode::Auto, "Queued hello.", 4),
        Encoding::Json,
    );
    let responses = request("replies.chat.1", "chat", body).await;
    let last = responses.last().unwrap();
    assert_eq!(last.error, None, "{last:?}");
    assert_eq!(last.finish_reason(), FinishReason::Length);
    let answer: String = responses.iter().map(|r| r.text.as_str()).collect();

    let mut c = client(&s).await;
    let stored = get(&mut c, "queued-1").await.unwrap();
    assert_eq!(roles(&stored), ["user", "assistant"]);
    assert_eq!(stored.messages[1].content, answer);
    // gRPC continues what NATS started.
    c.chat_complete(turn("queued-1", SessionMode::Continue, "And now?", 2))
        .await
        .unwrap();
    assert_eq!(get(&mut c, "queued-1").await.unwrap().messages.len(), 4);

    // A hostile session id and an unknown method get final errors.
    let body =
        codec::encode_chat_request(&turn("bad id*", SessionMode::Auto, "x", 2), Encoding::Json);
    let responses = request("replies.chat.2", "Chat", body).await;
    let error = responses.last().unwrap().error.clone().expect("an error");
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert!(error.message.starts_with("session_id: "), "{error:?}");
    let body = codec::encode_chat_request(&turn("ok", SessionMode::Auto, "x", 2), Encoding::Json);
    let responses = request("replies.chat.3", "Embed", body).await;
    let error = responses.last().unwrap().error.clone().expect("an error");
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert!(error.message.contains(headers::METHOD), "{error:?}");
}

#[tokio::test]
async fn bad_session_requests_get_clear_statuses() {
    let nats = NatsServer::start().unwrap();
    // A small context, so that a conversation outgrows it in two turns.
    let s = server(&nats, &["--max-context", "80"], &[]).await;
    let mut c = client(&s).await;

    for bad in ["", "a b", "a.*", "x..y", &"x".repeat(129)] {
        let mut req = turn(bad, SessionMode::Continue, "hi", 2);
        if bad.is_empty() {
            req.session_mode = SessionMode::Continue as i32;
            // An empty id is a stateless chat: CONTINUE means nothing there.
            c.chat_complete(req).await.unwrap();
            continue;
        }
        let err = c.chat_complete(req).await.unwrap_err();
        expect_status(err.clone(), Code::InvalidArgument, "session_id");
        let details = err.get_details_bad_request().expect("a BadRequest");
        assert_eq!(details.field_violations[0].field, "session_id");
        expect_status(
            get(&mut c, bad).await.unwrap_err(),
            Code::InvalidArgument,
            "session_id",
        );
    }
    let mut req = turn("s1", SessionMode::Auto, "hi", 2);
    req.messages.push(message("wizard", "boo"));
    expect_status(
        c.chat_complete(req).await.unwrap_err(),
        Code::InvalidArgument,
        "messages[1].role",
    );
    let mut req = turn("s1", SessionMode::Auto, "hi", 2);
    req.messages.clear();
    expect_status(
        c.chat_complete(req).await.unwrap_err(),
        Code::InvalidArgument,
        "messages",
    );
    let mut req = turn("s1", SessionMode::Auto, "hi", 2);
    req.session_mode = 9;
    expect_status(
        c.chat_complete(req).await.unwrap_err(),
        Code::InvalidArgument,
        "session_mode",
    );
    // Nothing was stored by the refused turns.
    expect_status(get(&mut c, "s1").await.unwrap_err(), Code::NotFound, "s1");

    // A conversation that outgrows the context is refused, naming the limit,
    // and left as it was; with truncate_history the oldest turn goes.
    let long = "Tell me about the weather in the mountains today.";
    c.chat_complete(turn("grow", SessionMode::Auto, long, 30))
        .await
        .unwrap();
    let before = get(&mut c, "grow").await.unwrap();
    let err = c
        .chat_complete(turn("grow", SessionMode::Continue, long, 30))
        .await
        .unwrap_err();
    expect_status(err, Code::FailedPrecondition, "context of 80 tokens");
    assert_eq!(get(&mut c, "grow").await.unwrap(), before);
    let mut req = turn("grow", SessionMode::Continue, "Briefly.", 30);
    req.truncate_history = true;
    let whole = c.chat_complete(req).await.unwrap().into_inner();
    let after = get(&mut c, "grow").await.unwrap();
    assert_eq!(roles(&after), ["user", "assistant"]);
    assert_eq!(after.messages[0].content, "Briefly.");
    assert_eq!(after.messages[1].content, whole.text);

    // The session names its model; another one is refused.
    let mut req = turn("grow", SessionMode::Continue, "hi", 2);
    req.model = "another".into();
    expect_status(
        c.chat_complete(req).await.unwrap_err(),
        Code::FailedPrecondition,
        "torchwire-tiny",
    );

    // A server without NATS has no sessions, and says so.
    let plain = Server::start(&[]).await.unwrap();
    let mut p = client(&plain).await;
    let err = p
        .chat_complete(turn("s1", SessionMode::Auto, "hi", 2))
        .await
        .unwrap_err();
    expect_status(err, Code::FailedPrecondition, "nats.url");
    expect_status(
        get(&mut p, "s1").await.unwrap_err(),
        Code::FailedPrecondition,
        "nats.url",
    );
}
