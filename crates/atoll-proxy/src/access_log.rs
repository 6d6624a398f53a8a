//! The JSON access log: one object per line, written by a background task so
//! that a slow disk never delays a request (lines are dropped, and counted,
//! when the writer falls behind).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// One request, as logged.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry<'a> {
    pub(crate) time: String,
    pub(crate) remote: String,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) protocol: &'a str,
    pub(crate) status: u16,
    pub(crate) duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cell: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) shard: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) via: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a str>,
}

/// A handle to the writer task.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    lines: mpsc::Sender<Vec<u8>>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer; fails when the file cannot be opened.
    pub(crate) fn start(target: &AccessLogTarget, dropped: Counter) -> std::io::Result<Self> {
        let mut writer: Box<dyn std::io::Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (lines, mut receiver) = mpsc::channel::<Vec<u8>>(8192);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buffer = Vec::with_capacity(64 * 1024);
                while let Some(line) = receiver.blocking_recv() {
                    buffer.extend_from_slice(&line);
                    while let Ok(more) = receiver.try_recv() {
                        buffer.extend_from_slice(&more);
                        if buffer.len() > 60 * 1024 {
                            break;
                        }
                    }
                    if writer
                        .write_all(&buffer)
                        .and_then(|()| writer.flush())
                        .is_err()
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    buffer.clear();
                }
            })?;
        Ok(Self { lines, dropped })
    }

    pub(crate) fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if self.lines.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}
