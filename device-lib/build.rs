//! Gives the shared library its SONAME, `libomega_device.so.<ABI major>`, so programs linked
//! against it record the ABI they were built for, and a vendor can install several majors
//! side by side. The major is `OMEGA_ABI_VERSION_MAJOR` in src/ffi.rs (one source of truth).

fn main() {
    println!("cargo:rerun-if-changed=src/ffi.rs");
    let ffi = std::fs::read_to_string("src/ffi.rs").expect("read src/ffi.rs");
    let major: u32 = ffi
        .lines()
        .find_map(|l| l.strip_prefix("pub const OMEGA_ABI_VERSION_MAJOR: u32 = "))
        .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
        .expect("src/ffi.rs defines `pub const OMEGA_ABI_VERSION_MAJOR: u32 = N;`");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libomega_device.so.{major}");
    }
}
