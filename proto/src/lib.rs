//! The gRPC contract between the afetm agent and analyzer, generated from `proto/afetm.proto`.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("afetm.v1");
}

/// Encoded `FileDescriptorSet` of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("afetm_descriptor");

pub use v1::*;

pub mod plan;
