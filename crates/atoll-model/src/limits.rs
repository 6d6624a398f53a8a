//! How large the configuration may grow. The control plane refuses a change
//! past these at apply time, with the resource and the limit named, so that
//! nothing it stores is more than every data-plane node can receive.

/// The most one resource may be, as the JSON the API returns and nodes
/// receive. Well above any real resource (a shard map of 5,000 ranges is
/// about 300 KiB), and below etcd's default request
/// limit (1.5 MiB), since a resource is stored as one etcd value.
pub const MAX_RESOURCE_BYTES: usize = 512 * 1024;

/// The most the whole configuration nodes receive may be (every resource
/// but the control plane's own records), as JSON: a node receives all of it
/// in its first snapshot.
pub const MAX_CONFIG_BYTES: usize = 32 * 1024 * 1024;

/// `bytes` in the largest unit that keeps it above 1 (`15.2 MiB`, `512 KiB`).
pub fn human_bytes(bytes: usize) -> String {
    const KIB: f64 = 1024.0;
    let value = bytes as f64;
    if value >= KIB * KIB {
        format!("{:.1} MiB", value / (KIB * KIB))
    } else if value >= KIB {
        format!("{:.0} KiB", value / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(MAX_RESOURCE_BYTES), "512 KiB");
        assert_eq!(human_bytes(MAX_CONFIG_BYTES), "32.0 MiB");
        assert_eq!(human_bytes(15_938_355), "15.2 MiB");
        assert_eq!(human_bytes(300), "300 bytes");
    }
}
