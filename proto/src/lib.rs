//! faultline-proto: the `faultline.v1` gRPC contracts, generated from
//! `proto/faultline/v1/*.proto` at build time.

/// Package `faultline.v1`: messages, clients and servers.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("faultline.v1");
}

pub mod client;
pub mod convert;

/// The pages (IPAs) a `DirtyLog` bitmap names: bit i of byte b is page
/// `gpa + (8 * b + i) * 4096` (KVM's layout, little-endian words).
pub fn dirty_pages(gpa: u64, bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    (0..bitmap.len() as u64 * 8)
        .filter(|&i| bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .map(move |i| gpa + i * 4096)
}

/// The encoded `FileDescriptorSet` of every file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/faultline_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn dirty_bitmaps_name_their_pages() {
        let pages: Vec<u64> = super::dirty_pages(0x4000_0000, &[0b1000_0001, 0, 0b10]).collect();
        assert_eq!(pages, [0x4000_0000, 0x4000_7000, 0x4001_1000]);
    }

    #[test]
    fn descriptor_set_names_the_services_and_messages_round_trip() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds.file.iter().find(|f| f.package() == "faultline.v1").unwrap();
        let services: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
        assert_eq!(services, ["FaultTrace", "Control", "WorkingSet"]);
        let e = super::v1::FaultEvent { fault_id: 7, esr: 0x9200_0047, memslot: Some(1), ..Default::default() };
        let back = super::v1::FaultEvent::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, e);
    }
}
