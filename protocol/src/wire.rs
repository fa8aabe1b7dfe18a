//! What a message costs on the wire.
//!
//! gRPC frames each message with a 5-byte prefix; Omega compresses with zstd both ways. These
//! helpers measure the same thing so benchmarks report bytes that match a packet capture.

use prost::Message;
use std::cell::RefCell;

/// gRPC length-prefix bytes per message.
pub const GRPC_FRAME_PREFIX: usize = 5;

/// The zstd level tonic uses for its zstd encoding.
pub const ZSTD_LEVEL: i32 = 0;

/// Bytes of `msg` as gRPC sends it with zstd compression: prefix + compressed payload.
/// Falls back to the uncompressed size when compression fails (it cannot on in-memory data).
///
/// Reuses one compression context per thread: creating a context (and zeroing its tables)
/// costs more than compressing a 5 KB message, and servers call this on every request.
pub fn grpc_zstd_size<M: Message>(msg: &M) -> usize {
    thread_local! {
        static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { RefCell::new(None) };
    }
    let raw = msg.encode_to_vec();
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut().and_then(|c| c.compress(&raw).ok()).map(|v| v.len())
    });
    GRPC_FRAME_PREFIX + compressed.unwrap_or(raw.len())
}

/// Bytes of `msg` encoded, uncompressed, with the gRPC prefix.
pub fn grpc_plain_size<M: Message>(msg: &M) -> usize {
    GRPC_FRAME_PREFIX + msg.encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn compression_shrinks_repetitive_messages_and_counts_the_prefix() {
        let g = pb::GlobalPatterns {
            trending: vec![
                pb::TrendSignal {
                    target: Some(pb::trend_signal::Target::ContentId("same-content".into())),
                    score: 1.0,
                    region: "eu-west".into(),
                };
                50
            ],
            ..Default::default()
        };
        assert_eq!(grpc_plain_size(&g), 5 + g.encoded_len());
        assert!(grpc_zstd_size(&g) < grpc_plain_size(&g) / 4);
        assert_eq!(grpc_plain_size(&pb::StatsRequest {}), 5);
    }
}
