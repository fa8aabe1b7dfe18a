//! Benchmark of the device library (filled in below).
fn main() {}
