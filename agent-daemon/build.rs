//! Records a floor for the wall clock: the time this crate's build script
//! last ran (or `SOURCE_DATE_EPOCH` for reproducible builds). A device whose
//! clock restarted at 1970 takes the time as at least this when it checks
//! the hub's certificate (see `tls::HubVerifier`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    });
    println!("cargo:rustc-env=OUTPOST_BUILD_TIME={secs}");
}
