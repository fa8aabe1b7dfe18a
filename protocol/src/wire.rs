//! What a message costs on the wire.
//!
//! gRPC frames each message with a 5-byte prefix; Omega compresses with zstd both ways. These
//! helpers measure the same thing so benchmarks report bytes that match a packet capture.

use prost::Message;

/// gRPC length-prefix bytes per message.
pub const GRPC_FRAME_PREFIX: usize = 5;

/// The zstd level tonic uses for its zstd encoding.
pub const ZSTD_LEVEL: i32 = 0;

/// Bytes of `msg` as gRPC sends it with zstd compression: prefix + compressed payload.
/// Falls back to the uncompressed size when compression fails (it cannot on in-memory data).
pub fn grpc_zstd_size<M: Message>(msg: &M) -> usize {
    let raw = msg.encode_to_vec();
    let compressed = zstd::bulk::compress(&raw, ZSTD_LEVEL).map(|c| c.len()).unwrap_or(raw.len());
    GRPC_FRAME_PREFIX + compressed
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
