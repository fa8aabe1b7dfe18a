//! Integration tests of omega-device against the real model, ONNX Runtime, SQLite and gRPC
//! over loopback. They need the run-time assets: `python3 scripts/assets.py fetch`.

mod bench;
mod brain;
mod c_abi;
mod common;
mod embedder;
mod persistence;
mod sync;
