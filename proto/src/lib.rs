//! The wire contract: generated code for the public API (`aquila.v1`) and the
//! internal worker API (`aquila.worker.v1`). Nothing but generated code, the
//! descriptor set for reflection, and the loading of TLS files that both
//! ends of every connection share ([`tls`]) lives here.

pub mod tls;

pub mod v1 {
    tonic::include_proto!("aquila.v1");
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("aquila.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto in this crate, for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("aquila_descriptor");
