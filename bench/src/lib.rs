//! Shared pieces of Atoll's benchmarks: percentiles and applies through
//! the REST API (with Atoll's own transport: TLS and tokens when asked).

use std::time::Duration;

/// Sorted samples with percentile lookups.
#[derive(Debug, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts the samples.
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }

    /// The `p`-th percentile (nearest rank), p in 0..=100.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// A zone manifest with a given weight: a one-resource change.
pub fn zone_manifest(name: &str, weight: u32) -> String {
    format!(
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {{name: {name}}}\nspec: {{region: bench, weight: {weight}}}\n"
    )
}

/// Applies `content` with a transport client (TLS and a token when the
/// control plane asks for them); returns the new revision.
pub async fn apply(rest: &atoll_transport::RestClient, content: &str) -> anyhow::Result<u64> {
    let body = serde_json::json!({"manifests": [{"source": "bench.yaml", "content": content}]});
    let value: serde_json::Value = rest.post("/v1/apply", &body).await?;
    value["revision"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no revision in {value}"))
}

/// Applies every manifest of a directory (e.g. `examples/topology`) so that
/// benchmarks run against a realistic store rather than an empty one.
pub async fn preload(
    rest: &atoll_transport::RestClient,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut manifests = Vec::new();
    for path in paths {
        manifests.push(serde_json::json!({"source": path.display().to_string(), "content": std::fs::read_to_string(&path)?}));
    }
    let _: serde_json::Value = rest
        .post("/v1/apply", &serde_json::json!({"manifests": manifests}))
        .await?;
    Ok(())
}
