//! Hub ids: the real hf-hub client against a local server that serves a model
//! directory the way huggingface.co does (`/{repo}/resolve/{revision}/{file}` with
//! ETag, X-Repo-Commit and Range support). The hub itself is never contacted.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kn::model::random::Layout;
use predicates::str::contains;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A tiny stand-in for huggingface.co on 127.0.0.1; records each request's path.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn serve(repo: &'static str, dir: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, repo, &dir, &log);
            }
        });
        Self { endpoint, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn handle(
    stream: TcpStream,
    repo: &str,
    dir: &Path,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let mut stream = stream;
    let prefix = format!("/{repo}/resolve/");
    let file = path
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_revision, file)| dir.join(file))
        .filter(|f| f.is_file());
    let Some(file) = file else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let mut bytes = Vec::new();
    std::fs::File::open(&file)?.read_to_end(&mut bytes)?;
    let total = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(total - 1).min(total - 1);
            (a, b)
        }
        None => (0, total - 1),
    };
    let body = &bytes[start..=end];
    let etag = kn::model::files::sha256_file(&file).unwrap();
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{total}\r\n\
         ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

const INPUT: &str = "{\"prompt\": \"the capital of france is [MASK] .\", \"answer\": \"paris\"}\n";

fn predict(
    model: &str,
    hf_home: &Path,
    endpoint: Option<&str>,
    offline: bool,
) -> assert_cmd::assert::Assert {
    let mut cmd = common::kn();
    cmd.args(["predict", "--quiet", "--model", model])
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .write_stdin(INPUT);
    if let Some(endpoint) = endpoint {
        cmd.env("HF_ENDPOINT", endpoint);
    } else {
        // An endpoint nothing listens on: any attempt to use the network fails.
        cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.assert()
}

#[test]
fn hub_models_download_into_the_cache_and_work_offline_afterwards() {
    let root = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&root.path().join("served"), Layout::default());
    let hub = FakeHub::serve("kn-test/tiny-bert", model.clone());
    let hf_home = root.path().join("hf-home");

    let local = common::kn()
        .args(["predict", "--quiet", "--model"])
        .arg(&model)
        .write_stdin(INPUT)
        .assert()
        .success();
    let expected = local.get_output().stdout.clone();

    let online = predict("kn-test/tiny-bert", &hf_home, Some(&hub.endpoint), false).success();
    assert_eq!(online.get_output().stdout, expected);
    let requests = hub.requests();
    for file in ["config.json", "model.safetensors"] {
        assert!(
            requests.contains(&format!("/kn-test/tiny-bert/resolve/main/{file}")),
            "{file} not requested: {requests:?}"
        );
    }
    // tokenizer.json does not exist there: kn falls back on vocab.txt.
    assert!(requests.iter().any(|r| r.ends_with("/vocab.txt")));
    let snapshot = hf_home.join(format!("hub/models--kn-test--tiny-bert/snapshots/{COMMIT}"));
    assert!(
        snapshot.join("model.safetensors").exists(),
        "{}",
        snapshot.display()
    );

    // Offline, from the cache only: same output, no request made.
    let before = hub.requests().len();
    let offline = predict("kn-test/tiny-bert", &hf_home, Some(&hub.endpoint), true).success();
    assert_eq!(offline.get_output().stdout, expected);
    assert_eq!(hub.requests().len(), before);

    // A revision goes into the URL.
    let mut cmd = common::kn();
    cmd.args([
        "predict",
        "--quiet",
        "--model",
        "kn-test/tiny-bert",
        "--revision",
        "v1.0",
    ])
    .env("HF_HOME", root.path().join("hf-home-3"))
    .env("HF_ENDPOINT", &hub.endpoint)
    .env_remove("HF_HUB_OFFLINE")
    .write_stdin(INPUT)
    .assert()
    .success();
    assert!(hub
        .requests()
        .iter()
        .any(|r| r == "/kn-test/tiny-bert/resolve/v1.0/config.json"));
}

#[test]
fn unreachable_hub_and_empty_cache_are_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    predict("kn-test/absent", &root.path().join("a"), None, false)
        .code(1)
        .stderr(contains("hub model kn-test/absent (revision main)"))
        .stderr(contains("could not be reached"))
        .stderr(contains("HF_HUB_OFFLINE=1"));
    predict("kn-test/absent", &root.path().join("b"), None, true)
        .code(1)
        .stderr(contains("none of config.json found"))
        .stderr(contains("HF_HUB_OFFLINE is set"));
}

#[test]
fn repository_without_the_file_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&root.path().join("served"), Layout::default());
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let hub = FakeHub::serve("kn-test/no-weights", model);
    predict(
        "kn-test/no-weights",
        &root.path().join("h"),
        Some(&hub.endpoint),
        false,
    )
    .code(1)
    .stderr(contains(
        "none of model.safetensors, pytorch_model.bin found",
    ));
    let requests = hub.requests();
    assert!(
        requests.iter().any(|r| r.ends_with("/pytorch_model.bin")),
        "{requests:?}"
    );
}
