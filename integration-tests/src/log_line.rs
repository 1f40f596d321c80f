//! Reading a server's JSON log (`--log-format json`) as it starts.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

/// The first JSON line on `child`'s piped stderr whose message is
/// `message`; panics when none comes within a minute.
pub fn first_log_line(child: &mut Child, message: &str) -> serde_json::Value {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server logs `{message}` within a minute"));
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["fields"]["message"] == message {
            return value;
        }
    }
}
