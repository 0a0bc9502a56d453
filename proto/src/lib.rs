//! faultline-proto: the `faultline.v1` gRPC contracts, generated from
//! `proto/faultline/v1/*.proto` at build time.

/// Package `faultline.v1`: messages, clients and servers.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("faultline.v1");
}

/// The encoded `FileDescriptorSet` of every file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/faultline_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_names_the_services_and_messages_round_trip() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds.file.iter().find(|f| f.package() == "faultline.v1").unwrap();
        let services: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
        assert_eq!(services, ["FaultTrace", "Control"]);
        let e = super::v1::FaultEvent { fault_id: 7, esr: 0x9200_0047, memslot: Some(1), ..Default::default() };
        let back = super::v1::FaultEvent::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, e);
    }
}
