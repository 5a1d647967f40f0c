//! The gRPC contract between the afetm agent and analyzer, generated from `proto/afetm.proto`.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("afetm.v1");
}

/// Encoded `FileDescriptorSet` of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("afetm_descriptor");

pub use v1::*;

/// gRPC metadata key naming the seq of a batch the analyzer refused, so the agent can drop
/// exactly that batch instead of resending it forever.
pub const BAD_SEQ_KEY: &str = "afetm-bad-seq";

pub mod costs;
pub mod plan;
